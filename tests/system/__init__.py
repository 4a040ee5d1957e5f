"""The system test (make test-system) and its helpers."""
