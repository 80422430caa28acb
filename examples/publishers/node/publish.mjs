// Publishes a member's enrolment and their first order to lifecycle, as a platform should.
//
//   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f EXCHANGE=commerce.events \
//     node publish.mjs MEMBER_ID ORDER_ID
//
// - a confirm channel: waitForConfirms resolves once the broker has every event, and fails
//   when one was refused; `mandatory` returns an event no queue took, which fails too;
// - persistent delivery, content type application/cloudevents+json;
// - routing key = the CloudEvents type;
// - a CloudEvents id made from the business fact ("enrolled-<member>", "order-<order>"), so a
//   retry after a failure publishes the same id, and lifecycle applies each event once.
import amqp from "amqplib";

const [memberId, orderId] = process.argv.slice(2);
const url = process.env.AMQP_URL ?? "amqp://guest:guest@127.0.0.1:5672/%2f";
const exchange = process.env.EXCHANGE ?? "commerce.events";

const cloudevent = (type, id, data) => ({
  specversion: "1.0",
  id,
  source: "examples/publishers/node",
  type,
  time: new Date().toISOString(),
  datacontenttype: "application/json",
  data,
});

const events = [
  cloudevent("member.enrolled", `enrolled-${memberId}`, {
    member_id: memberId,
    email: `${memberId}@example.com`,
    first_name: "Ada",
    locale: "en",
    timezone: "Europe/Istanbul",
    consent: { email: true, sms: false },
  }),
  cloudevent("order.placed", `order-${orderId}`, {
    order_id: orderId,
    member_id: memberId,
    total: 4200,
    currency: "EUR",
    items: [{ sku: "TEA-1", name: "Green tea", quantity: 2, unit_price: 2100 }],
  }),
];

const connection = await amqp.connect(url);
try {
  const channel = await connection.createConfirmChannel();
  let returned = null;
  channel.on("return", (message) => {
    returned = message.properties.messageId;
  });
  for (const event of events) {
    channel.publish(exchange, event.type, Buffer.from(JSON.stringify(event)), {
      contentType: "application/cloudevents+json",
      persistent: true,
      messageId: event.id,
      mandatory: true,
    });
  }
  await channel.waitForConfirms();
  if (returned) throw new Error(`event ${returned} reached no queue`);
  for (const event of events) console.log(`published ${event.type} ${event.id}`);
  await channel.close();
} finally {
  await connection.close();
}
