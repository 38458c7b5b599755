"""Training corpora by domain: larger pools of domain and general text than the benchmarks.

Importing this package registers every corpus, domain by domain (the order `forgetless data
list` shows); :mod:`forgetless.data.pools` combines them into one pool per domain.
"""

from forgetless.data.corpora import financial, general, legal, medical

for _domain in (medical, financial, legal, general):
    _domain.register()
