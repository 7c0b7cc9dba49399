"""The review loop: reviewer verdicts read back from a report's Lesions sheet into the run ledger
(``verdicts``), and the ensemble's local performance against those verdicts or a labels CSV
(``performance``; the metrics themselves are ``dermscore.evaluate``)."""
