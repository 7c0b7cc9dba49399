"""The gate stage, beside decode: what is not scored at all (``modality``) and what is scored with a
warning (``quality``). Both are cheap: they use what discovery and decode already hold."""
