"""The text policies of expansion mode, by name (``prompt.plan_prompt`` implements them). A module
of its own, without torch, so the CLI and the Serve config can offer the choices cheaply.

- ``mean-mask``: text and generated tokens through θ̄ = θ_pre + mean(m)∘τ* (the paper's);
- ``request-modality``: with one model's media in the request, every token through its θ̂_i;
- ``present-mean``: text through the mean mask of the models whose media are in the request;
- ``follow-media``: text after a media part through that part's model's θ̂ (text before the
  first media part through θ̄), generated tokens through the last media part's model's: best on
  the demo kit's mixed two-media prompts (bench/kit_quality.py: 61% vs θ̄'s 17%).
"""

TEXT_POLICIES = ("mean-mask", "request-modality", "present-mean", "follow-media")
DEFAULT_TEXT_POLICY = "mean-mask"
