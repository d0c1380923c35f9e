"""The embedded emoji data set: builder (``emoji``) and training data set (``loader``)."""
