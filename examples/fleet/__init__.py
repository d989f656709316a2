"""An example fleet for flowtrace: a taskiq worker (``worker.py``) and a FastAPI app
(``api.py``) that kicks ETL pipelines, as run by ``deploy/docker-compose.yml``."""
