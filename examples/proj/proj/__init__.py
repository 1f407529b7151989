# Importing the package imports the app, so `@shared_task` functions
# anywhere in the project find it as the current app.
from .celery import app as celery_app

__all__ = ("celery_app",)
