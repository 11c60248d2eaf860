package peer;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.atomic.AtomicBoolean;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.Produced;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.state.KeyValueStore;
import org.apache.kafka.streams.state.Stores;
import sun.misc.Signal;

/**
 * make bench's Kafka Streams peer: the worker's shape of work, not its identity rules.
 *
 * <p>For each raw record (key = device_id bytes, value = JSON bytes): read the device's state from a persistent
 * RocksDB key-value store (changelogged, Kafka Streams' default logging), update a small running identity
 * (anonymous id, last login id, a count), write the state back, and forward one output record per input, keyed
 * as it came, carrying the device's running identity (JSON). A record without a key or whose value is not a
 * JSON object gets one output too, an error record, and no state.
 *
 * <p>Settings: Kafka Streams' defaults (at_least_once, commit.interval.ms 30000, one stream thread, a 10 MiB
 * record cache), the store with the record cache on as the DSL's stores have it by default: a device's state
 * goes to RocksDB and its changelog once per commit or cache eviction, as the worker writes it once per batch.
 *
 * <p>Usage: {@code java -jar kstreams-peer.jar BOOTSTRAP APPLICATION_ID INPUT OUTPUT STATE_DIR}. SIGTERM closes
 * the application (its offsets committed, its store flushed) and the process exits; it prints nothing per record.
 */
public final class KStreamsPeer {
    static final String STORE = "devices";
    static final ObjectMapper JSON = new ObjectMapper();

    private KStreamsPeer() {}

    public static void main(String[] args) throws InterruptedException {
        if (args.length != 5) {
            System.err.println("usage: KStreamsPeer BOOTSTRAP APPLICATION_ID INPUT OUTPUT STATE_DIR");
            System.exit(2);
        }
        // before the first logger is made: warnings and errors only
        System.setProperty("org.slf4j.simpleLogger.defaultLogLevel", "warn");
        Properties props = new Properties();
        props.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        props.put(StreamsConfig.APPLICATION_ID_CONFIG, args[1]);
        props.put(StreamsConfig.STATE_DIR_CONFIG, args[4]);

        StreamsBuilder builder = new StreamsBuilder();
        builder.addStateStore(Stores.keyValueStoreBuilder(Stores.persistentKeyValueStore(STORE), Serdes.String(),
                Serdes.ByteArray()).withCachingEnabled());
        builder.stream(args[2], Consumed.with(Serdes.ByteArray(), Serdes.ByteArray()))
                .process(Identity::new, STORE)
                .to(args[3], Produced.with(Serdes.ByteArray(), Serdes.ByteArray()));

        KafkaStreams streams = new KafkaStreams(builder.build(), props);
        CountDownLatch done = new CountDownLatch(1);
        AtomicBoolean stopping = new AtomicBoolean(false);
        streams.setUncaughtExceptionHandler(e -> {
            e.printStackTrace();
            return StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });
        streams.setStateListener((now, before) -> {
            if (now == KafkaStreams.State.ERROR || now == KafkaStreams.State.NOT_RUNNING) {
                done.countDown();
            }
        });
        // SIGTERM and SIGINT close the application in main, which then exits 0 (a shutdown hook would exit 143)
        for (String name : new String[] {"TERM", "INT"}) {
            Signal.handle(new Signal(name), signal -> {
                stopping.set(true);
                done.countDown();
            });
        }
        streams.start();
        done.await();
        streams.close(Duration.ofSeconds(20));
        if (!stopping.get()) { // failed by itself, not stopped: say so with the exit code
            System.err.println("kstreams-peer: the application stopped in state " + streams.state());
            System.exit(1);
        }
        System.exit(0);
    }

    /** The running identity of each device, one output per input. */
    static final class Identity implements Processor<byte[], byte[], byte[], byte[]> {
        private ProcessorContext<byte[], byte[]> context;
        private KeyValueStore<String, byte[]> store;

        @Override
        public void init(ProcessorContext<byte[], byte[]> context) {
            this.context = context;
            this.store = context.getStateStore(STORE);
        }

        @Override
        public void process(Record<byte[], byte[]> record) {
            JsonNode event = parse(record.value());
            try {
                if (record.key() == null || !(event instanceof ObjectNode)) {
                    ObjectNode error = JSON.createObjectNode();
                    error.put("error", "no device_id, or not a JSON object");
                    error.put("raw", record.value() == null ? null : new String(record.value(), StandardCharsets.UTF_8));
                    context.forward(record.withValue(JSON.writeValueAsBytes(error)));
                    return;
                }
                String device = new String(record.key(), StandardCharsets.UTF_8);
                byte[] stored = store.get(device);
                ObjectNode state = stored == null ? fresh(device) : (ObjectNode) JSON.readTree(stored);
                update(state, (ObjectNode) event);
                store.put(device, JSON.writeValueAsBytes(state));
                ObjectNode identity = state.deepCopy();
                JsonNode login = state.get("login_id");
                identity.set("distinct_id", login.isNull() ? state.get("anonymous_id") : login);
                ((ObjectNode) event).set("identity", identity);
                context.forward(record.withValue(JSON.writeValueAsBytes(event)));
            } catch (IOException e) {
                throw new IllegalStateException("cannot read or write a device's state", e);
            }
        }

        static JsonNode parse(byte[] value) {
            if (value == null) {
                return null;
            }
            try {
                return JSON.readTree(value);
            } catch (IOException e) {
                return null;
            }
        }

        static ObjectNode fresh(String device) {
            ObjectNode state = JSON.createObjectNode();
            state.put("anonymous_id", device);
            state.putNull("login_id");
            state.put("events", 0L);
            return state;
        }

        /** The peers' rule (bench/peers/quix_peer.py has the same): login sets the login id, logout clears it,
         * identify sets the anonymous id; every record counts. */
        static void update(ObjectNode state, ObjectNode event) {
            String action = event.path("action").asText("track");
            JsonNode id = event.get("id");
            if (action.equals("login") && id != null && id.isTextual()) {
                state.put("login_id", id.asText());
            } else if (action.equals("logout")) {
                state.putNull("login_id");
            } else if (action.equals("identify") && id != null && id.isTextual()) {
                state.put("anonymous_id", id.asText());
            }
            state.put("events", state.path("events").asLong() + 1);
        }
    }
}
