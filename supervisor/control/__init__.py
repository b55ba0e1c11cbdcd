"""Stage 5, control: what talks to a running engine through its narrow API.

``server`` (the control socket, server and client), ``status`` (the status document), ``hints``
(known log lines turned into advice), ``metrics`` (the supervisor's Prometheus endpoint and targets
file), ``progress`` (start-up stages), ``notify`` (sd_notify), ``reload``, ``smoke``, ``scrape``
(reading the processes' /metrics) and ``logtail``. May import: engine and below.
"""
