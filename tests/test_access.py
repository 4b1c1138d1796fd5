"""Contract section 6, access control, against real servers."""

import os
import signal
import subprocess

import pytest
import yaml
from servers import http, twistd_command, wait_until

pytestmark = pytest.mark.timeout(60)

POOLS = [{"name": "backup"}, {"name": "deploy"}, {"pattern": "job-*"}]


def secret_file(tmp_path, name, secret, mode=0o600):
    path = tmp_path / f"{name}.secret"
    path.write_text(secret + "\n")
    os.chmod(path, mode)
    return str(path)


@pytest.fixture
def secured(start_server, tmp_path):
    access = [{"name": "ops", "secret_file": secret_file(tmp_path, "ops", "s3cret-ops"), "role": "admin"},
              {"name": "cron", "secret_file": secret_file(tmp_path, "cron", "s3cret-cron"), "role": "client",
               "pools": ["backup", "job-*"]}]
    return start_server(POOLS, access=access)


def call(server, path, secret=None, method="GET", data=None):
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return http(f"{server.url}{path}", method=method, data=data, headers=headers)


def test_a_request_without_a_secret_gets_401(secured):
    answer = call(secured, "/get/?pool=backup&host=a")
    assert (answer.status, answer.body) == (401, b"INVALID")
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in answer.headers["x-distributex-reason"]


def test_a_wrong_secret_gets_401(secured):
    assert call(secured, "/get/?pool=backup&host=a", "guess").status == 401


def test_health_needs_no_secret(secured):
    assert call(secured, "/health").body == b"OK"


def test_a_client_secret_takes_its_own_pools(secured):
    assert call(secured, "/get/?pool=backup&host=a", "s3cret-cron").body == b"YES"
    assert call(secured, "/get/?pool=job-nightly&host=a", "s3cret-cron").body == b"YES"


def test_a_client_secret_outside_its_pools_gets_403(secured):
    answer = call(secured, "/get/?pool=deploy&host=a", "s3cret-cron")
    assert (answer.status, answer.body) == (403, b"INVALID")
    assert answer.headers["x-distributex-reason"] == "access 'cron' may not use pool 'deploy'"


def test_a_client_secret_on_an_admin_path_gets_403(secured):
    answer = call(secured, "/reset/", "s3cret-cron", method="POST", data=b"pool=backup")
    assert (answer.status, answer.body) == (403, b"INVALID")
    assert answer.headers["x-distributex-reason"] == "access 'cron' is not admin"


def test_a_client_sees_only_its_pools_in_the_status(secured):
    names = [p["name"] for p in call(secured, "/status/?format=json", "s3cret-cron").json()["pools"]]
    assert names == ["backup"]
    assert call(secured, "/status/?pool=deploy", "s3cret-cron").status == 403


def test_an_admin_may_do_everything(secured):
    assert call(secured, "/get/?pool=deploy&host=a", "s3cret-ops").body == b"YES"
    assert call(secured, "/reset/", "s3cret-ops", method="POST", data=b"pool=deploy").body == b"OK"
    assert call(secured, "/metrics", "s3cret-ops").status == 200


def test_the_log_names_the_access_entry_and_never_a_secret(secured):
    call(secured, "/get/?pool=backup&host=a", "s3cret-cron")
    wait_until(lambda: "granted host=a" in secured.log(), timeout=5)
    (line,) = [line for line in secured.log().splitlines() if "granted host=a" in line]
    assert line.rstrip().endswith('by="127.0.0.1 cron"')
    assert "s3cret" not in secured.log()


def test_a_reload_picks_up_a_changed_secret(secured, tmp_path):
    (tmp_path / "cron.secret").write_text("n3w-cron\n")
    secured.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloaded" in secured.log(), timeout=10)
    assert call(secured, "/get/?pool=backup&host=a", "s3cret-cron").status == 401
    assert call(secured, "/get/?pool=backup&host=a", "n3w-cron").body == b"YES"


def test_a_world_readable_secret_file_stops_the_start_in_one_line(tmp_path):
    path = secret_file(tmp_path, "ops", "s3cret", mode=0o644)
    (tmp_path / "dx.yaml").write_text(yaml.safe_dump(
        {"pools": [{"name": "p"}], "access": [{"name": "ops", "secret_file": path, "role": "admin"}]}))
    proc = subprocess.run(twistd_command() + ["-n", "--pidfile=", "distributex", "-c", "dx.yaml",
                                              "--listen", "tcp:0:interface=127.0.0.1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    output = (proc.stdout + proc.stderr).strip()
    assert output.count("\n") == 0 and "readable by every user" in output and "Traceback" not in output
