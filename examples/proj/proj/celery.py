"""The Celery app of `proj`: `python -m minicelery -A proj worker` finds it here."""
from minicelery import Celery

app = Celery("proj", include=["proj.tasks"])
app.config_from_object("proj.celeryconfig")
