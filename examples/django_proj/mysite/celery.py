"""The Celery app of `mysite`: `python -m minicelery -A mysite worker` finds it here."""
import os

from minicelery import Celery

# The worker needs Django's settings too: point at them unless already set.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

app = Celery("mysite")

# Settings come from Django's settings.py; namespace='CELERY' means only
# names starting with CELERY_ count (CELERY_BROKER_URL sets broker_url).
app.config_from_object("django.conf:settings", namespace="CELERY")

# Find tasks.py in every app of INSTALLED_APPS.
app.autodiscover_tasks()


@app.task(bind=True, ignore_result=True)
def debug_task(self):
    print(f"Request: {self.request!r}")
