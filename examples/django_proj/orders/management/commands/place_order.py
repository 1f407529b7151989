from decimal import Decimal

from django.core.management.base import BaseCommand
from django.db import transaction

from orders.models import Order
from orders.tasks import process_order


class Command(BaseCommand):
    help = "Create an order and have a worker process it once the transaction commits."

    def add_arguments(self, parser):
        parser.add_argument("--name", default="widgets")
        parser.add_argument("--total", type=Decimal, default=Decimal("120.00"))
        parser.add_argument("--wait", action="store_true", help="wait for the task's result")
        parser.add_argument("--timeout", type=float, default=30.0)

    def handle(self, *args, name, total, wait, timeout, **options):
        sent = []
        with transaction.atomic():
            order = Order.objects.create(name=name, total=total)
            # Send only after COMMIT: a worker that is quick off the mark
            # must find the row, and a rollback must send nothing.
            transaction.on_commit(lambda: sent.append(process_order.delay(order.pk)))
        result = sent[0]
        self.stdout.write(f"Order {order.pk} placed: task {result.id}")
        if wait:
            self.stdout.write(f"Result: {result.get(timeout=timeout)}")
