"""Highway networks — being written."""
