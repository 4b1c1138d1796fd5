"""distributex.yaml: the compat forms, the defaults, and one clear line per mistake."""

import os

import pytest

from distributex.config import (
    DEFAULT_EXPIRE,
    POOL_KEYS,
    TOP_KEYS,
    ConfigError,
    load_config,
    parse_config,
)

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POOL = "pools: [{name: p}]\n"


def one_pool(body):
    """The single pool of a config whose pools list is `body` (YAML text)."""
    (spec,) = parse_config("pools:\n" + body).pools.values()
    return spec


def error(text, source="dx.yaml"):
    with pytest.raises(ConfigError) as info:
        parse_config(text, source)
    return str(info.value)


# -- compat forms and defaults ------------------------------------------------------


def test_the_2014_example_config_loads():
    config = parse_config(
        "backend: inmemory\n"
        "pools:\n"
        "  - name: pool1\n"
        "    expire: 300\n"
        "    servers: acme1, acme2\n"
        "  - name: pool2\n"
        "    maxlocks: 3\n")
    assert list(config.pools) == ["pool1", "pool2"]
    assert config.pools["pool1"].expire == 300
    assert config.pools["pool1"].servers == frozenset({"acme1", "acme2"})
    assert config.pools["pool2"].maxlocks == 3


def test_a_pool_defaults_to_a_1800_second_mutex_open_to_anyone():
    spec = one_pool("  - name: p\n")
    assert (spec.expire, spec.maxlocks, spec.servers) == (DEFAULT_EXPIRE, 1, None)
    assert DEFAULT_EXPIRE == 1800
    assert spec.allows("anyone")


def test_the_backend_defaults_to_inmemory():
    assert parse_config(POOL).backend == "inmemory"


def test_memcachehost_and_memcacheport_name_the_memcached():
    config = parse_config("backend: memcache\nmemcachehost: mc1\nmemcacheport: 11311\n" + POOL)
    assert config.backend == "memcache"
    assert config.memcache_servers == (("mc1", 11311),)


def test_memcached_defaults_to_localhost_11211():
    assert parse_config("backend: memcache\n" + POOL).memcache_servers == (("localhost", 11211),)


def test_memcache_servers_lists_several_memcacheds():
    config = parse_config("memcache_servers: ['10.0.0.5:11211', 'mc2:11212']\n" + POOL)
    assert config.memcache_servers == (("10.0.0.5", 11211), ("mc2", 11212))


@pytest.mark.parametrize("text", ["", "pools: []\n", "backend: inmemory\n"])
def test_a_config_with_no_pool_and_no_pattern_is_refused(text):
    assert error(text) == ("dx.yaml: pools: no pool and no pattern: this server could grant nothing "
                           "(add a pool, e.g. pools: [{name: pool1}])")


def test_pools_keep_the_order_of_the_file():
    config = parse_config("pools:\n  - name: zeta\n  - name: alpha\n  - name: mid\n")
    assert list(config.pools) == ["zeta", "alpha", "mid"]


def test_expire_accepts_an_integer():
    assert one_pool("  - name: p\n    expire: 300\n").expire == 300


def test_expire_accepts_a_float():
    assert one_pool("  - name: p\n    expire: 0.5\n").expire == 0.5


def test_expire_zero_means_never():
    assert one_pool("  - name: p\n    expire: 0\n").expire == 0


def test_servers_accepts_a_comma_string():
    spec = one_pool("  - name: p\n    servers: acme1, acme2 ,acme3\n")
    assert spec.servers == frozenset({"acme1", "acme2", "acme3"})


def test_servers_accepts_a_yaml_list():
    spec = one_pool("  - name: p\n    servers: [acme1, acme2]\n")
    assert spec.servers == frozenset({"acme1", "acme2"})


def test_a_single_server_string_allows_that_host_only():
    spec = one_pool("  - name: p\n    servers: acme1\n")
    assert spec.allows("acme1")
    assert not spec.allows("acme2")


def test_servers_allow_only_the_listed_hosts():
    spec = one_pool("  - name: p\n    servers: acme1, acme2\n")
    assert spec.allows("acme2")
    assert not spec.allows("acme3")
    assert not spec.allows("acme")


def test_a_pool_name_may_use_letters_digits_and_dot_colon_dash_underscore():
    assert one_pool("  - name: 'A-z_0.9:x'\n").name == "A-z_0.9:x"


def test_a_pool_name_of_128_characters_is_accepted():
    assert one_pool(f"  - name: {'p' * 128}\n").name == "p" * 128


def test_the_example_config_loads():
    config = load_config(os.path.join(ROOT, "distributex.yaml.example"))
    assert config.pools


def test_the_example_config_documents_every_key():
    with open(os.path.join(ROOT, "distributex.yaml.example"), encoding="utf-8") as f:
        text = f.read()
    missing = [key for key in sorted(TOP_KEYS | POOL_KEYS) if f"{key}:" not in text]
    assert missing == []


# -- mistakes: one line naming the file and the key or line --------------------------


def test_an_unknown_top_level_key_is_an_error_naming_it():
    message = error("pool:\n  - name: p\n")
    assert message.startswith("dx.yaml: ")
    assert "pool" in message and "unknown key" in message


def test_an_unknown_pool_key_is_an_error_naming_it():
    message = error("pools:\n  - name: p\n    maxlock: 2\n")
    assert "maxlock" in message and "unknown key" in message


def test_a_yaml_syntax_error_names_the_line():
    message = error("pools:\n  - name: p\n    expire: [300\n")
    assert message.startswith("dx.yaml: line ")
    assert "YAML" in message


def test_a_key_given_twice_is_an_error():
    message = error("pools:\n  - name: p\n    expire: 10\n    expire: 20\n")
    assert "duplicate key" in message and "expire" in message
    assert "line 4" in message


def test_a_duplicate_pool_name_is_an_error_naming_the_pool():
    message = error("pools:\n  - name: p\n  - name: q\n  - name: p\n")
    assert "duplicate pool" in message and "'p'" in message
    assert "pools[2]" in message


def test_a_pool_without_a_name_is_an_error():
    message = error("pools:\n  - expire: 10\n")
    assert "pools[0]" in message and "name" in message


@pytest.mark.parametrize("name", ["'has space'", "'sl/ash'", "''", "'" + "p" * 129 + "'", "12", "[a]"])
def test_a_bad_pool_name_is_an_error(name):
    message = error(f"pools:\n  - name: {name}\n")
    assert "pools[0].name" in message


@pytest.mark.parametrize("value", ["'300'", "true", "-1", ".nan", ".inf", "[1]"])
def test_a_bad_expire_is_an_error_naming_the_pool_and_key(value):
    message = error(f"pools:\n  - name: p\n    expire: {value}\n")
    assert "'p'" in message and "expire" in message


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "'2'", "true"])
def test_a_bad_maxlocks_is_an_error_naming_the_pool_and_key(value):
    message = error(f"pools:\n  - name: p\n    maxlocks: {value}\n")
    assert "'p'" in message and "maxlocks" in message


@pytest.mark.parametrize("value", ["''", "' , '", "[]", "[1, 2]", "{a: b}", "12"])
def test_a_bad_servers_is_an_error_naming_the_pool_and_key(value):
    message = error(f"pools:\n  - name: p\n    servers: {value}\n")
    assert "'p'" in message and "servers" in message


def test_an_unknown_backend_is_an_error():
    message = error("backend: redis\n")
    assert "backend" in message and "redis" in message


def test_a_memcacheport_out_of_range_is_an_error():
    assert "memcacheport" in error("memcacheport: 70000\n")


def test_a_memcacheport_that_is_not_a_number_is_an_error():
    assert "memcacheport" in error("memcacheport: eleven\n")


def test_memcache_servers_and_memcachehost_together_are_an_error():
    assert "memcache_servers" in error("memcachehost: a\nmemcache_servers: ['b:1']\n")


def test_a_bad_memcache_servers_entry_is_an_error():
    assert "memcache_servers" in error("memcache_servers: ['b:notaport']\n")


ETCD = "backend: etcd\n" + POOL


def test_etcd_endpoints_name_the_members_of_the_etcd_cluster():
    config = parse_config(ETCD + "etcd_endpoints: ['http://10.0.0.5:2379/', 'https://[::1]:2379']\n")
    assert config.etcd_endpoints == ("http://10.0.0.5:2379", "https://[::1]:2379")


@pytest.mark.parametrize("endpoint", ["10.0.0.5:2379", "http://h:2379/v3", "http://h:notaport",
                                      "http://h:70000", "http://a..b:2379", "http://:2379"])
def test_an_etcd_endpoint_that_is_not_a_host_and_port_url_is_an_error(endpoint):
    assert "etcd_endpoints" in error(ETCD + f"etcd_endpoints: ['{endpoint}']\n")


def test_etcd_keys_with_another_backend_are_an_error():
    assert "etcd_endpoints" in error(POOL + "etcd_endpoints: ['http://h:2379']\n")


def test_an_etcd_cert_without_its_key_is_an_error():
    assert "etcd_key go together" in error(ETCD + "etcd_endpoints: ['https://h:2379']\netcd_cert: c.pem\n")


def test_a_poll_interval_below_a_millisecond_is_an_error():
    assert "poll_interval" in error("poll_interval: 0\n")


def test_pools_that_is_not_a_list_is_an_error():
    assert "pools" in error("pools:\n  name: p\n")


def test_a_top_level_that_is_not_a_mapping_is_an_error():
    assert "top level" in error("- name: p\n")


@pytest.mark.parametrize("text", [
    "pool:\n",
    "pools:\n  - name: p\n    expire: [300\n",
    "pools:\n  - name: p\n  - name: p\n",
    "pools:\n  - expire: 3\n",
    "pools:\n  - name: p\n    maxlocks: many\n",
    "pools:\n  - name: p\n    expire: 1\n    expire: 2\n",
    "pools: {a: [\n",
])
def test_every_config_error_is_one_line_starting_with_the_file(text):
    message = error(text)
    assert message.startswith("dx.yaml: ")
    assert "\n" not in message


# -- reading the file ---------------------------------------------------------------


def test_load_config_names_the_file_in_its_errors(tmp_path):
    path = tmp_path / "distributex.yaml"
    path.write_text("pools:\n  - name: p\n    expire: soon\n")
    with pytest.raises(ConfigError, match="^" + str(path) + ": "):
        load_config(str(path))


def test_a_missing_file_is_an_error_naming_it(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(path + ": ")
    assert "cannot read" in str(info.value)


def test_a_directory_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path))


def test_a_file_that_is_not_utf8_is_an_error_naming_it(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"pools:\n  - name: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(str(path) + ": ")
    assert "UTF-8" in str(info.value)


def test_the_config_remembers_its_file(tmp_path):
    path = tmp_path / "distributex.yaml"
    path.write_text(POOL)
    assert load_config(str(path)).source == str(path)


# -- pools on demand: pattern entries ------------------------------------------------


def test_a_pattern_makes_a_pool_of_any_name_it_matches_with_its_settings():
    config = parse_config("pools:\n  - pattern: 'job-*'\n    expire: 600\n    maxlocks: 2\n    max_waiters: 5\n")
    spec = config.pools.find("job-backup")
    assert (spec.name, spec.expire, spec.maxlocks, spec.max_waiters, spec.pattern) == \
        ("job-backup", 600.0, 2, 5, "job-*")
    assert config.pools.find("other") is None


def test_a_named_pool_wins_over_a_pattern_that_matches_it():
    config = parse_config("pools:\n  - name: job-special\n    expire: 5\n  - pattern: 'job-*'\n    expire: 600\n")
    assert config.pools.find("job-special").expire == 5
    assert config.pools.find("job-other").expire == 600


def test_pattern_pools_are_not_listed_among_the_named_pools():
    config = parse_config("pools:\n  - name: a\n  - pattern: 'job-*'\n")
    assert list(config.pools) == ["a"]


@pytest.mark.parametrize("first, second, both", [
    ("job-*", "*-backup", "job-backup"),
    ("job-?", "job-[0-9]", "job-0"),
    ("*", "x*", "x"),
    ("a*b", "*ab*", "ab"),
])
def test_overlapping_patterns_are_an_error_naming_a_name_both_match(first, second, both):
    message = error(f"pools:\n  - pattern: '{first}'\n  - pattern: '{second}'\n")
    assert message.startswith(f"dx.yaml: pools[1].pattern: '{second}' overlaps '{first}'")
    assert f"both match {both!r}" in message


@pytest.mark.parametrize("first, second", [
    ("job-*", "task-*"),
    ("job-[0-4]", "job-[5-9]"),
    ("a?", "a??"),
    ("*.daily", "*.weekly"),
])
def test_patterns_that_match_no_common_name_are_accepted(first, second):
    config = parse_config(f"pools:\n  - pattern: '{first}'\n  - pattern: '{second}'\n")
    assert [p.pattern for p in config.pools.patterns] == [first, second]


@pytest.mark.parametrize("pattern, why", [
    ("job/*", "'/' is neither a pool name character nor a wildcard"),
    ("job-[0-9", "never closed"),
    ("job", "has no wildcard"),
    ("", "must be 1 to 128 characters"),
    ("[!A-Za-z0-9_.:-]*", "matches no character of a pool name"),
])
def test_an_invalid_pattern_is_an_error_saying_why(pattern, why):
    message = error(f"pools:\n  - pattern: '{pattern}'\n")
    assert message.startswith("dx.yaml: pools[0].pattern: ") and why in message


def test_an_entry_with_both_name_and_pattern_is_an_error():
    assert "give either 'name' (one pool) or 'pattern'" in error("pools:\n  - {name: a, pattern: 'a*'}\n")


def test_max_waiters_defaults_to_100000():
    assert one_pool("  - name: p\n").max_waiters == 100_000
