"""Stage 0 and glue: the demo data set, the tiny offline models, reports."""
