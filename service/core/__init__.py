"""Settings, errors, auth, limits and metrics: what every route shares."""
