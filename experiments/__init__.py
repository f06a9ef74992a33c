"""absl entry points: `python -m experiments.<name> --workdir=DIR [flags]`."""
