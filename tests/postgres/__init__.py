"""Real-server PostgreSQL tests (every test here is marked ``postgresql``)."""
