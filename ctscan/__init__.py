"""The `ctscan` command line; it stands above data_utils, ctmodels, tuning and results."""
