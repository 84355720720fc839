"""The text policies of expansion mode, by name (``prompt.plan_prompt`` implements them). A module
of its own, without torch, so the CLI and the Serve config can offer the choices cheaply.

- ``mean-mask``: text and generated tokens through θ̄ = θ_pre + mean(m)∘τ* (the paper's);
- ``request-modality``: with one model's media in the request, every token through its θ̂_i;
- ``present-mean``: text through the mean mask of the models whose media are in the request.
"""

TEXT_POLICIES = ("mean-mask", "request-modality", "present-mean")
DEFAULT_TEXT_POLICY = "mean-mask"
