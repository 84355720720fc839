"""The text policies of expansion mode, by name (``prompt.plan_prompt`` implements them). A module
of its own, without torch, so the CLI and the Serve config can offer the choices cheaply.

- ``mean-mask``: text and generated tokens through θ̄ = θ_pre + mean(m)∘τ* (the paper's);
- ``request-modality``: with one model's media in the request, every token through its θ̂_i;
- ``present-mean``: text through the mean mask of the models whose media are in the request;
- ``follow-media``: text after a media part through that part's model's θ̂ (text before the
  first media part through θ̄), generated tokens through the last media part's model's.

The default is ``follow-media``, the best measured on the demo kit's two-media prompts (a model's
media, another's, then the question about the last): 62% right in ``mmer demo`` (120 questions;
present-mean 26%, mean-mask 20%, chance 21%) and 58% in ``bench/kit_quality.py`` (720 questions;
present-mean 22%, mean-mask 11%). With one model's media, its question and answer go through that
model's θ̂ (94% retention there, as ``request-modality``); a request without media goes through θ̄
under every policy.
"""

TEXT_POLICIES = ("mean-mask", "request-modality", "present-mean", "follow-media")
DEFAULT_TEXT_POLICY = "follow-media"
