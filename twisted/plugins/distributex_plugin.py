from twisted.application.service import ServiceMaker

distributex = ServiceMaker(
    "distributex", "distributex.service",
    "A fair network mutex and semaphore service", "distributex")
