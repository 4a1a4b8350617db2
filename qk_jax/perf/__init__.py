"""Performance measurement: throughput of the model's steps (``benchmark``) and of the input pipeline (``data``)."""
