"""meshnode's trial suite. One fixed hypothesis profile for every property test: repeatable."""

from hypothesis import HealthCheck, settings

settings.register_profile("meshnode", max_examples=100, derandomize=True, deadline=None,
                          database=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("meshnode")
