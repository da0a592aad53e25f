# Thin aliases for ./dev.sh (which needs no make).
.PHONY: demo test
demo:
	./dev.sh demo
test:
	./dev.sh test
