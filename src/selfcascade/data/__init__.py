"""The embedded emoji data set: builders (``emoji``, ``emoji_clips``), their CLI (``commands``), loader."""
