from django.db import models


class Order(models.Model):
    NEW, PROCESSED = "new", "processed"

    name = models.CharField(max_length=100)
    total = models.DecimalField(max_digits=10, decimal_places=2)
    status = models.CharField(max_length=20, default=NEW)

    def __str__(self):
        return f"Order #{self.pk} {self.name} ({self.status}, {self.total})"
