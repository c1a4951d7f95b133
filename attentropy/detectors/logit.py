"""Logit statistics of the next-token distribution: mean and minimum token log-probability (MSP), mean entropy and
varentropy (Entropix's signal), and a probe on all of them; for answers and for single tokens."""

from __future__ import annotations

from ..features import answer_logit_statistics, token_logit_statistics
from .detector import Detector
from .fitting import fit_fixed, probe_fitter


def column(statistics, index: int, sign: float = 1.0):
    """Features: one column of a logit-statistics matrix (higher = more confident after `sign`)."""
    def features(a):
        return sign * statistics(a)[:, [index]]
    return features


# answer level: columns of answer_logit_statistics (mean log-prob, min log-prob, mean entropy, mean varentropy)
LOGIT_PROBE = Detector("logit_probe", "answer", "baseline", "logit", "logit statistics alone (4), L2 logistic probe",
                       answer_logit_statistics, probe_fitter())
MEAN_LOGPROB = Detector("mean_logprob", "answer", "baseline", "logit", "MSP: mean token log-probability",
                        column(answer_logit_statistics, 0), fit_fixed, training_free=True)
MIN_LOGPROB = Detector("min_logprob", "answer", "baseline", "logit", "minimum token log-probability",
                       column(answer_logit_statistics, 1), fit_fixed, training_free=True)
LOGIT_ENTROPY = Detector("logit_entropy", "answer", "baseline", "logit", "mean next-token entropy (negated)",
                         column(answer_logit_statistics, 2, -1.0), fit_fixed, training_free=True)
LOGIT_VARENTROPY = Detector("logit_varentropy", "answer", "baseline", "logit",
                            "mean next-token varentropy (negated; Entropix's signal)",
                            column(answer_logit_statistics, 3, -1.0), fit_fixed, training_free=True)

# token level: columns of token_logit_statistics (log-prob, entropy, varentropy)
TOKEN_LOGIT_PROBE = Detector("logit_probe", "token", "baseline", "logit",
                             "the token's logit statistics, logistic probe", token_logit_statistics,
                             probe_fitter(balanced=True))
TOKEN_LOGPROB = Detector("logprob", "token", "baseline", "logit", "the token's log-probability",
                         column(token_logit_statistics, 0), fit_fixed, training_free=True)
TOKEN_ENTROPY = Detector("logit_entropy", "token", "baseline", "logit", "next-token entropy (negated)",
                         column(token_logit_statistics, 1, -1.0), fit_fixed, training_free=True)
TOKEN_VARENTROPY = Detector("logit_varentropy", "token", "baseline", "logit", "next-token varentropy (negated)",
                            column(token_logit_statistics, 2, -1.0), fit_fixed, training_free=True)
