"""The Flower ClientApp side of fedpriv: local training on the client's own data."""
