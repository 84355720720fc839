"""The Ray Serve application of mmer-dist: one OpenAI-compatible endpoint over a merged store.

``serve.app`` binds the deployments (the only place that does); ``serve/config.yaml`` is a Serve
config for ``serve run`` / ``serve deploy``; ``mmer serve`` runs it on an embedded Ray.
"""

import logging

# A child of Serve's logger: in a replica its lines land in that replica's log, with Serve's format.
log = logging.getLogger("ray.serve.mmer")
