// A producer in another language: publish one command with publisher confirms and
// `mandatory`, then wait for its outcome on an exclusive reply_to queue.
//
// Environment: AMQP_URL, EXCHANGE, ROUTING_KEY, COMMAND (the JSON body), TIMEOUT_MS.
// Prints {"properties": {...}, "event": {...}} on stdout; exit 3 if the broker could not
// route the command, 4 if no outcome arrived in time.
import amqp from 'amqplib';

const { AMQP_URL, EXCHANGE, ROUTING_KEY, COMMAND } = process.env;
const timeoutMs = Number(process.env.TIMEOUT_MS ?? 20000);
const command = JSON.parse(COMMAND);
const correlationId = `node-${command.command_id ?? Date.now()}`;

const connection = await amqp.connect(AMQP_URL);
const channel = await connection.createConfirmChannel();
const { queue: replyQueue } = await channel.assertQueue('', { exclusive: true, autoDelete: true });

let returned = false;
channel.on('return', () => {
  returned = true;
});
const outcome = new Promise((resolve) => {
  channel.consume(
    replyQueue,
    (message) => {
      if (message && message.properties.correlationId === correlationId) resolve(message);
    },
    { noAck: true },
  );
});

channel.publish(EXCHANGE, ROUTING_KEY, Buffer.from(JSON.stringify(command), 'utf8'), {
  mandatory: true,
  persistent: true,
  contentType: 'application/json',
  messageId: command.command_id,
  correlationId,
  replyTo: replyQueue,
  timestamp: Math.floor(Date.now() / 1000),
});
await channel.waitForConfirms(); // a return arrives before its confirm
if (returned) {
  console.error('the broker could not route the command');
  process.exit(3);
}

const timer = setTimeout(() => {
  console.error(`no outcome within ${timeoutMs} ms`);
  process.exit(4);
}, timeoutMs);
const message = await outcome;
clearTimeout(timer);
const { contentType, correlationId: replyCorrelation, messageId } = message.properties;
console.log(
  JSON.stringify({
    properties: { contentType, correlationId: replyCorrelation, messageId },
    event: JSON.parse(message.content.toString('utf8')),
  }),
);
await connection.close();
