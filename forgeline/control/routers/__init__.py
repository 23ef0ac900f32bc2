"""One router per resource; each is thin and calls ``registry`` for the logic."""
