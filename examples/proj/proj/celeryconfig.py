"""Settings for `proj`, in Celery's lowercase names."""
import os

try:
    from kombu import Queue
except ImportError:  # kombu isn't needed: plain queue names work the same
    def Queue(name, **options):
        return name

# Unset (the default), minicelery keeps messages and results in ./minicelery.db.
# Export them to use Redis, e.g. PROJ_BROKER_URL=redis://localhost:6379/0
broker_url = os.environ.get("PROJ_BROKER_URL")
result_backend = os.environ.get("PROJ_RESULT_BACKEND")

task_queues = (Queue("default"), Queue("heavy"))
task_default_queue = "default"
task_routes = {"proj.tasks.crunch": {"queue": "heavy"}}

result_expires = 3600
timezone = "UTC"
