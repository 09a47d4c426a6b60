"""What jailer does on the host itself, on a caller's behalf and outside any sandbox."""
