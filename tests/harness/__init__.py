"""Real parts for tests: upstream servers, a private nginx, Prometheus, a systemd container."""
