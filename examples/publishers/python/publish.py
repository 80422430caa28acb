"""Publishes a member's enrolment and their first order to lifecycle, as a platform should.

    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f EXCHANGE=commerce.events \
        python publish.py MEMBER_ID ORDER_ID

- publisher confirms: basic_publish returns only once the broker has the event, and raises
  when it was refused or could not be routed (mandatory);
- persistent delivery (delivery_mode 2), content type application/cloudevents+json;
- routing key = the CloudEvents type;
- a CloudEvents id made from the business fact ("enrolled-<member>", "order-<order>"), so a
  retry after a failure publishes the same id, and lifecycle applies each event once.
"""
import datetime
import json
import os
import sys

import pika


def cloudevent(kind: str, event_id: str, data: dict) -> dict:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "examples/publishers/python",
        "type": kind,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "datacontenttype": "application/json",
        "data": data,
    }


def main() -> None:
    member_id, order_id = sys.argv[1:3]
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    exchange = os.environ.get("EXCHANGE", "commerce.events")
    events = [
        cloudevent("member.enrolled", f"enrolled-{member_id}", {
            "member_id": member_id,
            "email": f"{member_id}@example.com",
            "first_name": "Ada",
            "locale": "en",
            "timezone": "Europe/Istanbul",
            "consent": {"email": True, "sms": False},
        }),
        cloudevent("order.placed", f"order-{order_id}", {
            "order_id": order_id,
            "member_id": member_id,
            "total": 4200,
            "currency": "EUR",
            "items": [{"sku": "TEA-1", "name": "Green tea", "quantity": 2, "unit_price": 2100}],
        }),
    ]
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    for event in events:
        channel.basic_publish(
            exchange=exchange,
            routing_key=event["type"],
            body=json.dumps(event).encode(),
            properties=pika.BasicProperties(
                content_type="application/cloudevents+json",
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=event["id"],
            ),
            mandatory=True,
        )
        print(f"published {event['type']} {event['id']}")
    connection.close()


if __name__ == "__main__":
    main()
