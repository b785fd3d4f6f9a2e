"""``graft serve``: a run as a local web app (try page, review page) and an HTTP API."""
