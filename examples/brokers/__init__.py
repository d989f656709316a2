"""flowtrace on every real taskiq broker: one worker app per broker, same tasks.

=====================  ===========================================  ===================
module                 broker                                       result backend
=====================  ===========================================  ===================
``redis_stream``       taskiq-redis ``RedisStreamBroker``           Redis
``redis_list``         taskiq-redis ``ListQueueBroker``             Redis
``rabbitmq``           taskiq-aio-pika ``AioPikaBroker``            Redis
``nats``               taskiq-nats ``PullBasedJetStreamBroker``     Redis
=====================  ===========================================  ===================

Run a worker (events go to the gateway's Redis through ``FLOWTRACE_REDIS_URL``, traces
over OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set)::

    FLOWTRACE_REDIS_URL=redis://127.0.0.1:6379/0 \\
        taskiq worker examples.brokers.rabbitmq:broker --workers 2

and kick pipelines from any process that imports the same module
(``examples.brokers.tasks.Tasks.of(broker)`` finds the tasks). Settings come from the
environment with localhost defaults: ``REDIS_URL``, ``RABBITMQ_URL``, ``NATS_URL``,
``BROKER_QUEUE``, ``BROKER_REDELIVER_AFTER_S`` (see ``settings.py``).
``docs/brokers.md`` lists the caveats of each.
"""
