// The polyglot shop in Go (pgx v4 + amqp091-go), following docs/outbox-contract.md.
//
//	shop setup            declare the exchange and queue, create the tables
//	shop produce COUNT    place COUNT orders, each with its OrderReceived row in the outbox, in
//	                      one transaction (`wharf relay` publishes them)
//	shop consume          charge each order once through the inbox; with CRASH_AFTER_COMMIT=N,
//	                      exit (status 3) right after the Nth commit, before its ack, as a crash
//	                      there would
//
// DATABASE_URL (PostgreSQL) and BROKER_URL (AMQP) say where; QUEUE names the queue.
package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/jackc/pgx/v4"
	amqp "github.com/rabbitmq/amqp091-go"
)

const consumerName = "payment-service"

var ctx = context.Background()

func fail(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func queue() string {
	if name := os.Getenv("QUEUE"); name != "" {
		return name
	}
	return "payments-go"
}

func nowMs() int64 { return time.Now().UnixMilli() }

// A random (version 4) UUID.
func newID() string {
	var b [16]byte
	_, err := rand.Read(b[:])
	fail(err)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func database() *pgx.Conn {
	db, err := pgx.Connect(ctx, os.Getenv("DATABASE_URL"))
	fail(err)
	return db
}

func setup() {
	connection, err := amqp.Dial(os.Getenv("BROKER_URL"))
	fail(err)
	channel, err := connection.Channel()
	fail(err)
	fail(channel.ExchangeDeclare("shop", "topic", true, false, false, false, nil))
	_, err = channel.QueueDeclare(queue(), true, false, false, false, nil)
	fail(err)
	fail(channel.QueueBind(queue(), "order.#", "shop", false, nil))
	fail(connection.Close())
	db := database()
	defer db.Close(ctx)
	fail(db.BeginFunc(ctx, func(tx pgx.Tx) error {
		for _, statement := range []string{
			"CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, customer TEXT NOT NULL, cents BIGINT NOT NULL)",
			"CREATE TABLE IF NOT EXISTS payments (order_id TEXT NOT NULL, message_id TEXT NOT NULL)",
			"CREATE TABLE IF NOT EXISTS absorbed (message_id TEXT NOT NULL)",
			// The inbox, as the contract gives it.
			`CREATE TABLE IF NOT EXISTS wharf_inbox (consumer TEXT NOT NULL, message_id TEXT NOT NULL,
				processed_at BIGINT NOT NULL, PRIMARY KEY (consumer, message_id))`,
		} {
			if _, err := tx.Exec(ctx, statement); err != nil {
				return err
			}
		}
		return nil
	}))
}

func produce(count int) {
	db := database()
	defer db.Close(ctx)
	for index := 0; index < count; index++ {
		orderID, customer := fmt.Sprintf("order-%d", index), fmt.Sprintf("customer-%d", index%7)
		body, err := json.Marshal(map[string]interface{}{"order_id": orderID, "cents": 100 + index})
		fail(err)
		fail(db.BeginFunc(ctx, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, "INSERT INTO orders (id, customer, cents) VALUES ($1, $2, $3)", orderID, customer, 100+index); err != nil {
				return err
			}
			// Writers of one ordering key take turns, so seq order is commit order.
			if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtext('wharf_outbox'), hashtext($1))", customer); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `INSERT INTO wharf_outbox (id, exchange, routing_key, ordering_key, headers,
					content_type, message_type, body, created_at)
				VALUES ($1, 'shop', 'order.received', $2, $3, 'application/json', 'OrderReceived', $4, $5)
				ON CONFLICT (id) DO NOTHING`, newID(), customer, `{"source":"go"}`, body, nowMs()); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, "SELECT pg_notify('wharf_outbox', '')")
			return err
		}))
	}
}

func consume(crashAfter int) {
	db := database()
	connection, err := amqp.Dial(os.Getenv("BROKER_URL"))
	fail(err)
	channel, err := connection.Channel()
	fail(err)
	fail(channel.Qos(16, 0, false))
	deliveries, err := channel.Consume(queue(), "", false, false, false, false, nil)
	fail(err)
	committed := 0
	for delivery := range deliveries {
		if delivery.MessageId == "" {
			// Cannot be de-duplicated, and a retry cannot give it an id.
			fail(delivery.Reject(false))
			continue
		}
		var order struct {
			OrderID string `json:"order_id"`
		}
		fail(json.Unmarshal(delivery.Body, &order))
		fail(db.BeginFunc(ctx, func(tx pgx.Tx) error {
			inserted, err := tx.Exec(ctx, `INSERT INTO wharf_inbox (consumer, message_id, processed_at)
				VALUES ($1, $2, $3) ON CONFLICT (consumer, message_id) DO NOTHING`, consumerName, delivery.MessageId, nowMs())
			if err != nil {
				return err
			}
			if inserted.RowsAffected() == 1 {
				_, err = tx.Exec(ctx, "INSERT INTO payments (order_id, message_id) VALUES ($1, $2)", order.OrderID, delivery.MessageId)
			} else {
				_, err = tx.Exec(ctx, "INSERT INTO absorbed (message_id) VALUES ($1)", delivery.MessageId)
			}
			return err
		}))
		committed++
		if crashAfter > 0 && committed == crashAfter {
			os.Exit(3) // committed, not acknowledged: the broker redelivers it
		}
		fail(delivery.Ack(false))
	}
	fail(fmt.Errorf("the broker closed the consumer"))
}

func main() {
	command := ""
	if len(os.Args) > 1 {
		command = os.Args[1]
	}
	switch {
	case command == "setup":
		setup()
	case command == "produce" && len(os.Args) == 3:
		count, err := strconv.Atoi(os.Args[2])
		fail(err)
		produce(count)
	case command == "consume":
		crashAfter, _ := strconv.Atoi(os.Getenv("CRASH_AFTER_COMMIT"))
		consume(crashAfter)
	default:
		fmt.Fprintln(os.Stderr, "usage: shop setup | produce COUNT | consume")
		os.Exit(2)
	}
}
