"""Third-party MQTT clients against Wharf: paho-mqtt (3.1.1 and 5.0) and Debian's mosquitto_pub /
mosquitto_sub, with pika for the AMQP side. Run by compat/mqtt.sh, which starts the broker and
passes: MQTT port, AMQP port, the broker's restart command file (for the kill -9 case).

Each check waits on events (a message arriving, a callback firing) with a generous bound that
only stops a hang; none asserts on time.
"""
import os
import queue
import signal
import subprocess
import sys
import threading
import uuid

import paho.mqtt.client as mqtt
import pika

MQTT_PORT = int(sys.argv[1])
AMQP_PORT = int(sys.argv[2])
CONTROL = sys.argv[3]  # a directory: compat/mqtt.sh restarts the broker when asked (see below)
WAIT_S = 30
USER, PASSWORD = "guest", "guest"


def client(client_id, protocol=mqtt.MQTTv311, clean=True):
    kwargs = {"client_id": client_id, "protocol": protocol}
    if protocol != mqtt.MQTTv5:
        kwargs["clean_session"] = clean
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
    c.username_pw_set(USER, PASSWORD)
    c.received = queue.Queue()
    c.connacks = queue.Queue()
    c.on_message = lambda _c, _u, message: c.received.put(message)
    c.on_connect = lambda _c, _u, flags, reason, _p: c.connacks.put((flags, reason))
    return c


def connect(c, clean=True, protocol=mqtt.MQTTv311, expiry_s=None):
    if protocol == mqtt.MQTTv5:
        from paho.mqtt.properties import Properties
        from paho.mqtt.packettypes import PacketTypes
        properties = Properties(PacketTypes.CONNECT)
        if expiry_s is not None:
            properties.SessionExpiryInterval = expiry_s
        c.connect("127.0.0.1", MQTT_PORT, keepalive=30, clean_start=clean, properties=properties)
    else:
        c.connect("127.0.0.1", MQTT_PORT, keepalive=30)
    c.loop_start()
    flags, reason = c.connacks.get(timeout=WAIT_S)
    assert not reason.is_failure, f"CONNACK refused: {reason}"
    return flags


def subscribe(c, topic, qos):
    done = threading.Event()
    granted = []
    c.on_subscribe = lambda _c, _u, _mid, codes, _p: (granted.extend(codes), done.set())
    c.subscribe(topic, qos)
    assert done.wait(WAIT_S), "no SUBACK"
    return granted


def next_message(c):
    return c.received.get(timeout=WAIT_S)


def mosquitto_pub(topic, payload, qos=1, version="mqttv311"):
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(MQTT_PORT), "-u", USER, "-P", PASSWORD,
         "-V", version, "-q", str(qos), "-t", topic, "-m", payload, "-i", f"pub-{uuid.uuid4().hex[:8]}"],
        check=True, timeout=WAIT_S)


def restart_broker_with_kill9():
    """Asks compat/mqtt.sh to SIGKILL the broker and start it again; waits until it has."""
    request = os.path.join(CONTROL, "restart")
    done = os.path.join(CONTROL, "restarted")
    if os.path.exists(done):
        os.remove(done)
    open(request, "w").close()
    for _ in range(WAIT_S * 10):
        if os.path.exists(done):
            return
        threading.Event().wait(0.1)
    raise AssertionError("the broker was not restarted")


def check_mosquitto_pub_and_sub():
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(MQTT_PORT), "-u", USER, "-P", PASSWORD,
         "-q", "1", "-t", "farm/+/soil", "-C", "1", "-v", "-i", "mosq-sub"],
        stdout=subprocess.PIPE, text=True)
    # mosquitto_sub prints nothing when subscribed; a retained-free probe loop publishes until it
    # has received one (the first publishes may precede its SUBSCRIBE).
    for attempt in range(WAIT_S * 10):
        mosquitto_pub("farm/field-3/soil", "wet", qos=1)
        try:
            out, _ = sub.communicate(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            continue
    else:
        sub.kill()
        raise AssertionError("mosquitto_sub received nothing")
    assert out.strip() == "farm/field-3/soil wet", out
    print("mosquitto_pub -> mosquitto_sub: ok")


def check_amqp_to_mqtt_and_back():
    sub = client("paho-interop")
    connect(sub)
    assert subscribe(sub, "orders/#", 1)[0].value == 1
    amqp = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", AMQP_PORT))
    channel = amqp.channel()
    channel.confirm_delivery()
    channel.basic_publish("amq.topic", "orders.eu.created", b"order 1",
                          pika.BasicProperties(delivery_mode=2, headers={"source": "pika"}))
    message = next_message(sub)
    assert (message.topic, message.payload, message.qos) == ("orders/eu/created", b"order 1", 1), message
    # MQTT -> AMQP
    queue_name = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue_name, "amq.topic", "telemetry.#")
    info = sub.publish("telemetry/t1/humidity", b"40", qos=1)
    info.wait_for_publish(WAIT_S)
    for method, properties, body in channel.consume(queue_name, inactivity_timeout=WAIT_S):
        assert method is not None, "nothing reached AMQP"
        assert (method.routing_key, body, properties.delivery_mode) == ("telemetry.t1.humidity", b"40", 2)
        break
    channel.cancel()
    amqp.close()
    sub.loop_stop()
    sub.disconnect()
    print("AMQP <-> MQTT through amq.topic: ok")


def check_qos_2_both_ways(protocol):
    name = "5.0" if protocol == mqtt.MQTTv5 else "3.1.1"
    sub = client(f"paho-q2-sub-{name}", protocol)
    connect(sub, protocol=protocol)
    granted = subscribe(sub, "ledger/#", 2)[0]
    assert granted.value == 2, granted
    pub = client(f"paho-q2-pub-{name}", protocol)
    connect(pub, protocol=protocol)
    for index in range(20):
        info = pub.publish(f"ledger/{index}", f"entry {index}", qos=2)
        info.wait_for_publish(WAIT_S)
        assert info.is_published()
    got = [next_message(sub) for _ in range(20)]
    assert [m.payload.decode() for m in got] == [f"entry {i}" for i in range(20)], got
    assert all(m.qos == 2 for m in got)
    # Nothing twice: the next message after the twenty is a marker sent after them.
    pub.publish("ledger/end", "end", qos=2).wait_for_publish(WAIT_S)
    assert next_message(sub).payload == b"end"
    for c in (sub, pub):
        c.loop_stop()
        c.disconnect()
    print(f"QoS 2 publish and subscribe over MQTT {name}: ok")


def check_persistent_session_across_kill9(protocol):
    name = "5.0" if protocol == mqtt.MQTTv5 else "3.1.1"
    client_id = f"paho-persistent-{name}"
    device = client(client_id, protocol, clean=False)
    connect(device, clean=False, protocol=protocol, expiry_s=3600)
    assert subscribe(device, "plant/line-1/#", 1)[0].value == 1
    device.loop_stop()
    device.disconnect()
    for index in range(5):
        mosquitto_pub("plant/line-1/press", f"reading {index}", qos=1)
    restart_broker_with_kill9()
    device = client(client_id, protocol, clean=False)
    flags = connect(device, clean=False, protocol=protocol, expiry_s=3600)
    assert flags.session_present, "the session did not survive kill -9"
    got = [next_message(device).payload.decode() for _ in range(5)]
    assert got == [f"reading {i}" for i in range(5)], got
    device.loop_stop()
    device.disconnect()
    print(f"persistent session across kill -9 over MQTT {name}: ok")


def check_retained():
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(MQTT_PORT), "-u", USER, "-P", PASSWORD,
         "-q", "1", "-r", "-t", "rooms/lab/temp", "-m", "19.5", "-i", "retainer"],
        check=True, timeout=WAIT_S)
    out = subprocess.run(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(MQTT_PORT), "-u", USER, "-P", PASSWORD,
         "-q", "1", "-t", "rooms/+/temp", "-C", "1", "-v", "-i", "late-reader"],
        check=True, timeout=WAIT_S, capture_output=True, text=True).stdout
    assert out.strip() == "rooms/lab/temp 19.5", out
    late = client("paho-retained", mqtt.MQTTv5)
    connect(late, protocol=mqtt.MQTTv5)
    subscribe(late, "rooms/#", 1)
    message = next_message(late)
    assert (message.topic, message.payload, message.retain) == ("rooms/lab/temp", b"19.5", True), message
    late.loop_stop()
    late.disconnect()
    print("retained message to mosquitto_sub and paho 5.0: ok")


def check_will():
    watcher = client("paho-watcher")
    connect(watcher)
    subscribe(watcher, "status/#", 1)
    # A client process that sets a will and is killed with SIGKILL.
    script = (
        "import paho.mqtt.client as mqtt, threading, time\n"
        "ready = threading.Event()\n"
        "c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id='doomed')\n"
        f"c.username_pw_set('{USER}', '{PASSWORD}')\n"
        "c.will_set('status/doomed', b'gone', qos=1)\n"
        "c.on_connect = lambda *args: ready.set()\n"
        f"c.connect('127.0.0.1', {MQTT_PORT}, keepalive=30)\n"
        "c.loop_start()\n"
        "assert ready.wait(30)\n"
        "print('connected', flush=True)\n"
        "time.sleep(3600)\n"
    )
    doomed = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert doomed.stdout.readline().strip() == "connected"
    # It printed once its CONNACK came, so the broker holds its will.
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    message = next_message(watcher)
    assert (message.topic, message.payload) == ("status/doomed", b"gone"), message
    watcher.loop_stop()
    watcher.disconnect()
    print("will after SIGKILL of the client: ok")


def check_no_local_and_retain_as_published():
    from paho.mqtt.subscribeoptions import SubscribeOptions
    member = client("paho-chat", mqtt.MQTTv5)
    connect(member, protocol=mqtt.MQTTv5)
    done = threading.Event()
    member.on_subscribe = lambda *_args: done.set()
    member.subscribe([("chat/#", SubscribeOptions(qos=1, noLocal=True)),
                      ("news/kept/#", SubscribeOptions(qos=1, retainAsPublished=True)),
                      ("news/plain/#", SubscribeOptions(qos=1))])
    assert done.wait(WAIT_S), "no SUBACK"
    member.publish("chat/room", b"mine", qos=1).wait_for_publish(WAIT_S)
    mosquitto_pub("chat/room", "theirs", version="mqttv5")
    message = next_message(member)
    assert message.payload == b"theirs", f"its own publish came back: {message.payload}"
    for topic in ("news/kept/1", "news/plain/1"):
        subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(MQTT_PORT), "-u", USER, "-P", PASSWORD,
             "-V", "mqttv5", "-q", "1", "-r", "-t", topic, "-m", "headline", "-i", f"news-{uuid.uuid4().hex[:8]}"],
            check=True, timeout=WAIT_S)
        message = next_message(member)
        assert message.topic == topic, message.topic
        assert message.retain == (topic == "news/kept/1"), (topic, message.retain)
    member.loop_stop()
    member.disconnect()
    print("no-local and retain-as-published over MQTT 5.0: ok")


def check_qos_2_exactly_once_across_kill9():
    """QoS 2 both ways with persistent sessions while the broker is killed with SIGKILL in the
    middle: the subscriber gets every entry exactly once."""
    sub = client("paho-q2-ledger", mqtt.MQTTv5)
    sub.reconnect_delay_set(min_delay=1, max_delay=2)
    connect(sub, clean=False, protocol=mqtt.MQTTv5, expiry_s=3600)
    assert subscribe(sub, "ledger2/#", 2)[0].value == 2
    pub = client("paho-q2-bank", mqtt.MQTTv5)
    pub.reconnect_delay_set(min_delay=1, max_delay=2)
    connect(pub, clean=False, protocol=mqtt.MQTTv5, expiry_s=3600)
    sent = [pub.publish(f"ledger2/{index}", f"entry {index}", qos=2) for index in range(25)]
    restart_broker_with_kill9()
    # Both reconnect on their own (paho's loop); the unfinished flows of the first half go on
    # from where they were. The subscriber's session is present (its queue); the publisher's is
    # only if a flow of it was unfinished at the kill (as RabbitMQ, Wharf keeps no empty session).
    for c in (sub, pub):
        flags, reason = c.connacks.get(timeout=WAIT_S)
        assert not reason.is_failure, reason
        assert flags.session_present or c is pub, flags
    sent += [pub.publish(f"ledger2/{index}", f"entry {index}", qos=2) for index in range(25, 50)]
    for info in sent:
        info.wait_for_publish(WAIT_S)
    got = []
    try:
        for _ in range(50):
            got.append(next_message(sub).payload.decode())
    except queue.Empty:
        raise AssertionError(f"received {len(got)} of 50: {sorted(got)}; published: {[i.is_published() for i in sent]}")
    assert sorted(got) == sorted(f"entry {i}" for i in range(50)), got
    pub.publish("ledger2/end", "end", qos=2).wait_for_publish(WAIT_S)
    assert next_message(sub).payload == b"end", "an entry came twice"
    for c in (sub, pub):
        c.loop_stop()
        c.disconnect()
    print("QoS 2 exactly once across kill -9 over MQTT 5.0: ok")


check_mosquitto_pub_and_sub()
check_amqp_to_mqtt_and_back()
check_no_local_and_retain_as_published()
check_qos_2_both_ways(mqtt.MQTTv311)
check_qos_2_both_ways(mqtt.MQTTv5)
check_persistent_session_across_kill9(mqtt.MQTTv311)
check_persistent_session_across_kill9(mqtt.MQTTv5)
check_qos_2_exactly_once_across_kill9()
check_retained()
check_will()
print("mqtt: all checks passed")
