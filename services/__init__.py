"""rlfeed's long-running processes (one sub-package each) and the libraries they share."""
