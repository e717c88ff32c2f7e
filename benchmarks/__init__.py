"""The DiffDenoise benchmark against its peers (not part of the product package)."""
