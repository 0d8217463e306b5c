"""What each entry point runs: ``train``, ``search``, ``evaluate``, ``export``."""
