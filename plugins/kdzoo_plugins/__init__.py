"""First-party kdzoo plugins. The core never imports this package; it reaches it through entry points."""
