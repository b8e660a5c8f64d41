"""Admin HTTP API: health, readiness, metrics and the mtactl verbs.

``server`` (app, token check), ``facade`` (all the API sees of its node), ``routes`` (one
module per resource), ``errors`` (the one error style), ``views`` and ``peers`` (queue and
message reports, cluster fan-out).
"""
