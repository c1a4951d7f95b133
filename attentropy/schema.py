"""The column schema of a run: the names of the statistics recorded for every generated token (torch-free, so that
reading a run needs no torch)."""

# per layer x query head, over the attention row of the query that predicts the token
ATTN_STATS = ("entropy", "varentropy", "sink_mass", "prompt_mass", "diag_mass", "prev_mass")
# of the next-token distribution that produced the token
TOKEN_STATS = ("logprob", "logit_entropy", "logit_varentropy")
