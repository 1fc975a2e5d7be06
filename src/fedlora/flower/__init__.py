"""Run fedlora strategies on Flower (``pip install fedlora[flower]``): a ServerApp and a ClientApp on
Flower's Message API that reuse the embedded engine's client code and the core strategies. The
core never imports flwr; only this package does."""
