"""The instrument as a detector: a logistic probe on the normalised attention statistics per layer x head and the
logit statistics of the answer (or of the tokens so far, or of one token), and its variants (attention alone,
with the best hidden layer)."""

from __future__ import annotations

from ..features import answer_features, prefix_features, token_features
from .detector import Detector
from .fitting import probe_fitter
from .hidden_state import answer_mean, fit_best_layer


def attention_only(a):
    """`answer_features` without the four logit statistics."""
    return answer_features(a)[:, :-4]


def with_hidden(a):
    return answer_features(a), answer_mean(a)


INSTRUMENT = Detector("instrument", "answer", "instrument", "attention",
                      "attention (6 statistics per layer x head) + logit statistics, L2 logistic probe",
                      answer_features, probe_fitter(), prefix_features=prefix_features)
ATTENTION = Detector("attention", "answer", "instrument", "attention", "attention statistics alone, L2 logistic probe",
                     attention_only, probe_fitter())
ATTENTION_HIDDEN = Detector("attention_hidden", "answer", "instrument", "attention",
                            "the instrument's features + the hidden-state probe's (its best layer)", with_hidden,
                            fit_best_layer, needs=("hidden",))
TOKEN_INSTRUMENT = Detector("instrument", "token", "instrument", "attention",
                            "the token's attention statistics (per layer, mean over heads) + its logit statistics, L2 "
                            "logistic probe", token_features, probe_fitter(balanced=True))
