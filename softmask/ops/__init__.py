"""Autograd Functions, backend dispatch, input validation and torch.library registration."""
