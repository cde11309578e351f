"""Installing models on the device: a pure state machine and the installer that drives it."""
