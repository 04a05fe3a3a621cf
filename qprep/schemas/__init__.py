"""Every contract qprep keeps: settings, model specs, per-video metadata."""
