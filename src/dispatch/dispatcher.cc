#include "dispatch/dispatcher.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <ctime>

#include "config/config.h"
#include "dispatch/runtime.h"
#include "util/json_number.h"
#include "util/strings.h"

namespace lhpc::dispatch {

Dispatcher::Dispatcher(DispatcherOptions opts, BrokerPort& broker, HandlerPort& handlers, CrashRecordPort* record)
    : m_opts(std::move(opts)),
      m_broker(broker),
      m_handlers(handlers),
      m_record(record),
      m_slots(static_cast<std::size_t>(std::max(1, m_opts.slots)) + 1) {
  m_opts.slots = std::max(1, m_opts.slots);
  m_slot_cap = m_opts.slots;
}

Dispatcher::Message* Dispatcher::find(std::uint64_t id) {
  auto it = m_msgs.find(id);
  return it == m_msgs.end() ? nullptr : &it->second;
}

int Dispatcher::free_slots() const {
  int n = 0;
  int taken = 0;
  for (int i = 0; i < m_opts.slots; ++i) {
    if (m_slots[i].reserved_for != 0) {
      ++taken;
    } else if (m_slots[i].ready) {
      ++n;
    }
  }
  return std::max(0, std::min(n, m_slot_cap - taken));
}

int Dispatcher::busy_slots() const {
  int n = 0;
  for (int i = 0; i < m_opts.slots; ++i) {
    if (m_slots[i].request != 0) {
      ++n;
    }
  }
  return n;
}

bool Dispatcher::idle() const { return m_msgs.empty(); }

int Dispatcher::desired_prefetch() const {
  // A task waiting for a slot is not counted: it is the reserve (or, when a
  // prefetch change was in flight, beyond it), so the broker keeps what
  // comes after it until a slot frees.
  int held = 0;
  for (const auto& [id, m] : m_msgs) {
    bool holds = m.kind != Kind::task || m.holds_slots;  // control, moved, malformed until confirmed
    held += (holds && !m.orphan && !m.no_ack) ? 1 : 0;
  }
  return prefetch_for(free_slots(), held);
}

bool Dispatcher::desired_slot_consumer() const {
  // A free slot that a waiting task is about to take is not free: no
  // start-and-cancel between an ack and the next schedule().
  auto waiting = static_cast<int>(m_waiting.size());
  if (free_slots() > waiting) {
    return true;
  }
  return waiting > 0 ? m_slot_consumer : false;
}

void Dispatcher::update_prefetch() {
  if (!m_connected || m_draining) {
    return;
  }
  int want = desired_prefetch();
  if (want != m_prefetch) {
    m_broker.set_prefetch(want);
    m_prefetch = want;
  }
  bool slot = desired_slot_consumer();
  if (slot != m_slot_consumer) {
    m_broker.set_slot_consumer(slot);
    m_slot_consumer = slot;
  }
}

// --- connection ------------------------------------------------------------

void Dispatcher::on_connected(int prefetch, bool slot_consumer) {
  m_connected = true;
  m_prefetch = prefetch;
  m_slot_consumer = slot_consumer;
  update_prefetch();
}

void Dispatcher::on_disconnected() {
  m_connected = false;
  m_prefetch = 0;
  m_pending.clear();  // sequence numbers of a dead channel mean nothing now
  m_waiting.clear();
  std::vector<std::uint64_t> gone(m_control_todo.begin(), m_control_todo.end());  // never sent
  m_control_todo.clear();
  for (auto& [id, m] : m_msgs) {
    m.orphan = true;
    m.confirms = 0;
    m.next = m.end;
    if (m.running == 0) {
      gone.push_back(id);
    }
  }
  for (auto id : gone) {
    release_slots(id);
    m_msgs.erase(id);
  }
  // Slots reserved for calls that will now never start are free again.
  for (int i = 0; i < m_opts.slots; ++i) {
    if (m_slots[i].request == 0) {
      m_slots[i].reserved_for = 0;
    }
  }
}

// --- deliveries ------------------------------------------------------------

void Dispatcher::on_delivery(amqp::Delivery d) {
  // The rank queue is consumed without acks: never ack, reject or requeue
  // what comes through it. Published to the default exchange, its routing key
  // is the queue's name.
  bool no_ack = !m_opts.rank_queue.empty() && d.exchange.empty() && d.routing_key == m_opts.rank_queue;
  if (m_draining || m_aborted) {
    if (!no_ack) {
      m_broker.reject(d.tag, true);  // in flight before our basic.cancel reached the broker
    }
    return;
  }
  Message m;
  m.id = m_next_id++;
  m.d = std::move(d);
  m.no_ack = no_ack;
  // The publisher chose the id: no escape sequence of theirs reaches a log or terminal.
  m.mid = m.d.props.message_id.empty() ? body_id(m.d.body) : escape_controls(m.d.props.message_id);
  m.crashes = static_cast<int>(amqp::table_int(m.d.props.headers, k_hdr_crashes, 0));
  if (m.d.oversized) {
    auto reason = "over rabbitmq.max_message_bytes: " + std::to_string(m.d.body_size) + " bytes (limit " +
                  std::to_string(m_opts.limits.max_bytes) + "); the body was discarded as it arrived";
    spdlog::warn("message {} is {}: moving its headers to {}", m.mid, reason, dead_queue());
    refuse(std::move(m), {}, reason);
    return;
  }
  if (m.d.props.headers.contains(k_hdr_wanted_runtime)) {
    move_away(std::move(m), Away{Away::To::drop, {}});  // a notice for the autoalloc controller: not a request
    return;
  }
  if (m.d.redelivered && m_record && m_record->killed_before(m.d.body)) {
    spdlog::error("message {} killed a dispatcher on this node before: moving it to {}", m.mid, dead_queue());
    refuse(std::move(m), m.d.body,
           "killed a dispatcher while it was processed (rank " + std::to_string(m_opts.rank) + ", " + m_opts.node +
               "): never processed again");
    return;
  }
  if (int t = m.d.redelivered ? timeouts_of(m.d.body) : 0; t >= m_opts.max_timeouts) {
    spdlog::error("message {} ran past the broker's consumer_timeout {} times: moving it to {}", m.mid, t,
                  dead_queue());
    refuse(std::move(m), m.d.body,
           "ran longer than the broker's consumer_timeout " + std::to_string(t) +
               " times (the broker took it back each time): never run again; raise the broker's consumer_timeout "
               "(see lithops-hpc(1), FAILURE SEMANTICS)");
    return;
  }
  // Everything from decoding to handing the calls out runs under the record.
  if (m_record) {
    m_record->begin(m.d.body);
  }
  accept(std::move(m));
  if (m_record) {
    m_record->end();
  }
}

void Dispatcher::refuse(Message&& m, std::string body, const std::string& reason) {
  m.kind = Kind::malformed;
  m.phase = Phase::running;
  auto& ref = m_msgs.emplace(m.id, std::move(m)).first->second;
  dead_letter(ref, body, reason, ref.crashes);
}

int Dispatcher::timeouts_of(const std::string& body) const {
  auto it = m_timeouts.find(std::hash<std::string>{}(body));
  return it == m_timeouts.end() ? 0 : it->second;
}

std::string Dispatcher::on_consumer_timeout(std::chrono::milliseconds timeout) {
  ++m_counters.consumer_timeouts;
  auto now = Clock::now();
  // The broker names no delivery: note every task running for at least
  // half the timeout (the broker checks on a timer), else the oldest one.
  std::vector<Message*> culprits;
  Message* oldest = nullptr;
  for (auto& [id, m] : m_msgs) {
    if (m.kind != Kind::task || m.no_ack || m.orphan || m.running == 0) {
      continue;
    }
    if (!oldest || m.arrived < oldest->arrived) {
      oldest = &m;
    }
    if (timeout.count() > 0 && now - m.arrived >= timeout / 2) {
      culprits.push_back(&m);
    }
  }
  if (culprits.empty() && oldest) {
    culprits.push_back(oldest);
  }
  if (m_timeouts.size() > 4096) {
    m_timeouts.clear();  // bounded: a long-lived worker forgets old ones
  }
  std::string what;
  for (Message* m : culprits) {
    int n = ++m_timeouts[std::hash<std::string>{}(m->d.body)];
    auto one = "job " + bounded_for_log(m->calls.job_key(), k_logged_id_bytes) + " (message " + m->mid + ", " +
               std::to_string(n) + " of " + std::to_string(m_opts.max_timeouts) + ")";
    what += (what.empty() ? "" : ", ") + one;
  }
  return what;
}

void Dispatcher::accept(Message&& m) {
  auto decoded = decode(m.d.body, m_opts.limits);
  if (auto* bad = std::get_if<Malformed>(&decoded)) {
    spdlog::warn("message {} is malformed ({}): moving it to {}", m.mid, bad->reason, dead_queue());
    refuse(std::move(m), m.d.body, "malformed: " + bad->reason);
    return;
  }
  auto& task = std::get<Task>(decoded);
  m.action = task.action;
  if (auto away = elsewhere(m, task)) {
    move_away(std::move(m), *away);
    return;
  }
  auto id = m.id;
  if (m.action != Action::send_task) {
    m.payload = std::move(task.payload);
    m.kind = Kind::control;
    m.phase = Phase::running;
    m.running = 1;
    spdlog::debug("{} {} -> control handler", k_action_names.text(m.action), m.mid);
    m_msgs.emplace(id, std::move(m));
    m_control_todo.push_back(id);
    send_control();
    update_prefetch();  // held now: the reserve is free again, and no free slot's place is taken
    return;
  }
  if (!fits_memory(m, task.payload)) {
    return;
  }
  m.calls = Calls(std::move(task.payload));
  m.kind = Kind::task;
  m.phase = Phase::waiting;
  m.arrived = Clock::now();
  m.patient = m_returned.contains(std::hash<std::string>{}(m.d.body));
  m_msgs.emplace(id, std::move(m));
  m_waiting.push_back(id);
  schedule();
}

std::optional<Dispatcher::Away> Dispatcher::elsewhere(const Message& m, const Task& t) const {
  if (m_opts.runtime.empty() || t.action == Action::ping) {
    return std::nullopt;
  }
  std::string name = json_string(t.payload, "runtime_name");
  if (name.empty()) {
    return std::nullopt;  // names no runtime: runs anywhere
  }
  if (t.action == Action::get_metadata) {
    if (metadata_name_is(name, m_opts.runtime)) {
      return std::nullopt;
    }
    // A copy for every runtime already: this one is not ours.
    if (m.d.exchange == runtimes_exchange(m_opts.queue)) {
      return Away{Away::To::drop, {}};
    }
    return Away{Away::To::fanout, runtimes_exchange(m_opts.queue)};
  }
  if (name == m_opts.runtime) {
    return std::nullopt;
  }
  if (auto problem = config::runtime_name_problem(name)) {
    return Away{Away::To::invalid, *problem};
  }
  return Away{Away::To::queue, runtime_queue(m_opts.queue, name)};
}

void Dispatcher::move_away(Message&& m, const Away& a) {
  m.kind = Kind::moved;
  m.phase = Phase::running;
  auto& ref = m_msgs.emplace(m.id, std::move(m)).first->second;
  switch (a.to) {
    case Away::To::invalid:
      spdlog::warn("message {} names an invalid runtime ({}): moving it to {}", ref.mid, a.target, dead_queue());
      dead_letter(ref, ref.d.body, "invalid runtime_name: " + a.target, ref.crashes);
      break;
    case Away::To::drop:
      spdlog::debug("message {}: a copy for another runtime than {} or a notice, dropped", ref.mid, m_opts.runtime);
      maybe_complete(ref);
      return;
    case Away::To::queue:
    case Away::To::fanout: {
      amqp::Properties p = ref.d.props;
      p.delivery_mode = 2;
      std::uint64_t seq = 0;
      if (a.to == Away::To::queue) {
        // Before every move, not once per connection: a queue deleted since
        // (lithops clean, a person) would take a confirmed publish into
        // nothing, and the task would be lost. One frame per moved message.
        m_broker.declare_queue(a.target);
        seq = m_broker.publish(a.target, ref.d.body, p);
      } else {
        p.expiration = k_metadata_copy_ttl_ms;  // the client stops waiting about then
        seq = m_broker.publish_to_exchange(a.target, ref.d.body, p);
      }
      spdlog::debug("{} {}: not for runtime {}, moved to {}", k_action_names.text(ref.action), ref.mid, m_opts.runtime,
                    a.target);
      m_pending[seq] = {ref.id, Purpose::move};
      ++ref.confirms;
      ++m_counters.moved;
      break;
    }
  }
  update_prefetch();  // held until confirmed: the reserve is free again
}

void Dispatcher::on_declared(const std::string& queue, std::uint32_t consumers, Clock::time_point now) {
  const std::string prefix = runtime_queue(m_opts.queue, "");
  if (consumers > 0 || !m_connected || !queue.starts_with(prefix)) {
    return;
  }
  std::string runtime = queue.substr(prefix.size());
  auto it = m_wanted.find(runtime);
  if (it != m_wanted.end() && now - it->second < std::chrono::seconds(k_wanted_notice_interval_s)) {
    return;
  }
  if (m_wanted.size() > 4096) {
    m_wanted.clear();  // bounded: a long-lived worker forgets old ones
  }
  m_wanted[runtime] = now;
  amqp::Properties p;
  p.headers[k_hdr_wanted_runtime] = runtime;
  auto exchange = wanted_exchange(m_opts.queue);
  m_broker.declare_exchange(exchange);
  m_broker.publish_to_exchange(exchange, {}, p);  // its confirm is nobody's: lost with no listener, as meant
  spdlog::info("runtime {}: nothing consumes {}: told the autoalloc controller (if one listens)",
               bounded_for_log(runtime, 200), bounded_for_log(queue, 300));
}

bool Dispatcher::fits_memory(Message& m, const Json& payload) {
  long long need = json_int(payload, "runtime_memory", 0);
  int cap = memory_slot_cap(m_opts.slots, m_opts.memory_mb, need);
  if (cap == 0) {
    std::string why = "runtime_memory " + std::to_string(need) + " MiB exceeds the " +
                      std::to_string(m_opts.memory_mb) + " MiB rank " + std::to_string(m_opts.rank) + " on " +
                      m_opts.node + " has (cgroup limit, Slurm allocation or RAM, shared by its node's ranks)";
    spdlog::error("message {}: {}: moving it to {}", m.mid, why, dead_queue());
    m.kind = Kind::malformed;
    m.phase = Phase::running;
    auto& ref = m_msgs.emplace(m.id, std::move(m)).first->second;
    dead_letter(ref, ref.d.body, why, ref.crashes);
    update_prefetch();
    return false;
  }
  if (cap != m_slot_cap) {
    spdlog::info("runtime_memory {} MiB: {} of {} slots in use ({} MiB here)", need, cap, m_opts.slots,
                 m_opts.memory_mb);
    m_slot_cap = cap;
  }
  return true;
}

std::string Dispatcher::home_queue(const Message& m) const {
  if (!m_opts.runtime.empty() && m.d.exchange.empty() &&
      m.d.routing_key == runtime_queue(m_opts.queue, m_opts.runtime)) {
    return m.d.routing_key;
  }
  return m_opts.queue;
}

void Dispatcher::schedule() {
  while (!m_waiting.empty() && !m_draining) {
    int free = free_slots();
    if (free == 0) {
      break;
    }
    auto id = m_waiting.front();
    m_waiting.pop_front();
    if (auto* m = find(id)) {
      start_task(*m, static_cast<std::size_t>(free));
    }
  }
  update_prefetch();
}

amqp::Properties Dispatcher::republish_props(const Message& m) const {
  amqp::Properties p = m.d.props;
  p.delivery_mode = 2;
#if LHPC_TEST_HOOKS
  p.headers.erase(k_hdr_sent_ns);  // a remainder's latency is not the original's
#endif
  return p;
}

void Dispatcher::start_task(Message& m, std::size_t free) {
  if (m.patient) {
    m_returned.erase(std::hash<std::string>{}(m.d.body));
  }
  const std::size_t calls = m.calls.size();
  std::size_t keep = std::min(calls, free);
  std::size_t reserved = 0;
  for (int i = 0; i < m_opts.slots && reserved < keep; ++i) {
    if (m_slots[i].ready && m_slots[i].reserved_for == 0) {
      m_slots[i].reserved_for = m.id;
      ++reserved;
    }
  }
  m.holds_slots = true;
  m.next = 0;
  m.end = keep;
  if (keep < calls) {
    auto seq =
        m_broker.publish(home_queue(m), encode_text(Action::send_task, m.calls.slice(keep, calls)), republish_props(m));
    m_pending[seq] = {m.id, Purpose::remainder};
    ++m.confirms;
    ++m_counters.splits;
    m.phase = Phase::confirming;
    spdlog::debug("{} ({}): {} free slots, keeping {} calls, republishing {}", m.mid, m.calls.describe(0, calls), free,
                  keep, calls - keep);
    return;  // the calls start once the broker has confirmed the remainder
  }
  m.phase = Phase::running;
  start_calls(m);
}

void Dispatcher::start_calls(Message& m) {
  if (m.phase != Phase::running) {
    return;
  }
  for (int i = 0; i < m_opts.slots && m.next < m.end; ++i) {
    Slot& s = m_slots[i];
    if (s.reserved_for != m.id || !s.ready || s.request != 0) {
      continue;
    }
    s.call = m.calls.slice(m.next, m.next + 1, /*one_call=*/true);
    s.what = m.calls.describe(m.next, m.next + 1);
    ++m.next;
    s.request = m_next_request++;
    ++m.running;
    send_request(i, s.request, Action::send_task, s.call);
  }
}

void Dispatcher::send_request(int h, std::uint64_t request, Action action, const std::string& payload_json) {
  std::string line = "{\"id\":" + std::to_string(request) + ",\"action\":\"" +
                     std::string(k_action_names.text(action)) + "\",\"payload\":";
  line += payload_json;
  line += "}\n";
  m_handlers.send(h, line);
}

void Dispatcher::send_control() {
  Slot& c = m_slots[static_cast<std::size_t>(control())];
  if (!c.ready) {
    return;
  }
  // Pipelined: the handler answers in order, one line per request.
  while (!m_control_todo.empty()) {
    auto id = m_control_todo.front();
    m_control_todo.pop_front();
    Message* m = find(id);
    if (!m) {
      continue;
    }
    auto req = m_next_request++;
    m_control_out.push_back({id, req});
    // The payload is within max_message_depth: dump() recurses that deep at most.
    send_request(control(), req, m->action, m->payload.dump());
  }
}

// --- confirms, handlers ----------------------------------------------------

void Dispatcher::on_confirm(const amqp::Confirm& c) {
  auto it = m_pending.find(c.seq);
  if (it == m_pending.end()) {
    return;  // a publish nobody waits for (ping replies)
  }
  PendingConfirm p = it->second;
  m_pending.erase(it);
  Message* m = find(p.msg);
  if (!m) {
    return;
  }
  --m->confirms;
  if (!c.ack) {
    spdlog::error("the broker refused a message published for {}: giving the original back to the queue", m->mid);
    m->give_back = true;
    if (p.purpose == Purpose::remainder) {
      m->next = m->end;
      m->phase = Phase::running;
      for (int i = 0; i < m_opts.slots; ++i) {
        if (m_slots[i].reserved_for == m->id && m_slots[i].request == 0) {
          m_slots[i].reserved_for = 0;
        }
      }
    }
  } else if (p.purpose == Purpose::remainder) {
    m->phase = Phase::running;
    start_calls(*m);
  }
  maybe_complete(*m);
  schedule();
}

void Dispatcher::on_handler_ready(int h) {
  if (h < 0 || h >= handlers()) {
    return;
  }
  m_slots[static_cast<std::size_t>(h)].ready = true;
  if (h == control()) {
    send_control();
    return;
  }
  if (auto id = m_slots[static_cast<std::size_t>(h)].reserved_for) {
    if (Message* m = find(id)) {
      start_calls(*m);
    }
  }
  schedule();
}

void Dispatcher::on_handler_reply(int h, const Json& reply) {
  if (h < 0 || h >= handlers()) {
    return;
  }
  std::uint64_t id = 0;
  if (auto it = reply.find("id"); it != reply.end()) {
    id = json_integer<std::uint64_t>(*it).value_or(0);
  }
  bool ok = json_bool(reply, "ok");
  std::string error = json_string(reply, "error");

  if (h == control()) {
    if (m_control_out.empty() || m_control_out.front().request != id) {
      spdlog::warn("control handler answered request {} that is not the one it was given: ignored", id);
      return;
    }
    auto cr = m_control_out.front();
    m_control_out.pop_front();
    if (Message* m = find(cr.msg)) {
      answer_control(*m, ok, reply, error);
    }
    return;
  }

  Slot& s = m_slots[static_cast<std::size_t>(h)];
  if (s.request == 0 || s.request != id) {
    spdlog::warn("handler {} answered request {} that is not the one it runs: ignored", h, id);
    return;
  }
  auto msg_id = s.reserved_for;
  std::string what = std::move(s.what);
  s.call.clear();
  s.request = 0;
  s.reserved_for = 0;
  if (Message* m = find(msg_id); m && m->orphan) {
    ++m_counters.duplicates;  // the broker has it back: it runs again somewhere
    spdlog::warn("call {} finished after the broker took its message {} back: it runs again (duplicate {})", what,
                 m->mid, m_counters.duplicates);
  }
  if (ok) {
    ++m_counters.tasks_done;
  } else {
    ++m_counters.tasks_failed;
    spdlog::warn("call {} could not run: {}", what, bounded_for_log(error));
  }
  if (Message* m = find(msg_id)) {
    --m->running;
    maybe_complete(*m);
  }
  schedule();
}

void Dispatcher::answer_control(Message& m, bool ok, const Json& reply, const std::string& error) {
  if (m.action == Action::ping) {
    ++m_counters.pings;
    if (ok && !m.orphan && m_connected && !m.d.props.reply_to.empty()) {
      amqp::Properties p;
      p.correlation_id = m.d.props.correlation_id;
      p.content_type = "application/json";
      Json echo = reply.contains("echo") ? reply["echo"] : Json();
      m_broker.publish(m.d.props.reply_to, ping_reply(m_opts.rank, m_opts.node, echo).dump(), p);
    } else if (!ok) {
      spdlog::warn("ping {} failed in the control handler: {}", m.mid, bounded_for_log(error));
    }
  } else {
    ++m_counters.metadata;
    std::string runtime = bounded_for_log(json_string(m.payload, "runtime_name", "?"), 200);
    if (ok) {
      spdlog::info("runtime metadata for {} stored", runtime);
    } else {
      spdlog::error("get_metadata for {} failed: {}", runtime, bounded_for_log(error));
    }
  }
  --m.running;
  maybe_complete(m);
}

void Dispatcher::on_handler_lost(int h, const std::string& why) {
  if (h < 0 || h >= handlers()) {
    return;
  }
  Slot& s = m_slots[static_cast<std::size_t>(h)];
  s.ready = false;
  if (h == control()) {
    if (m_control_out.empty()) {
      return;
    }
    // The handler works in order: the first outstanding request is the one
    // that was running; the rest are simply sent again to its successor.
    auto culprit = m_control_out.front();
    m_control_out.pop_front();
    for (auto it = m_control_out.rbegin(); it != m_control_out.rend(); ++it) {
      m_control_todo.push_front(it->msg);
    }
    m_control_out.clear();
    if (Message* m = find(culprit.msg)) {
      ++m_counters.handler_crashes;
      --m->running;
      crashed(*m, {}, std::string(k_action_names.text(m->action)) + " " + m->mid, why);
    }
    return;
  }
  if (s.request != 0) {
    auto msg_id = s.reserved_for;
    std::string call = std::move(s.call);
    std::string what = std::move(s.what);
    s.call.clear();
    s.request = 0;
    s.reserved_for = 0;
    ++m_counters.handler_crashes;
    if (Message* m = find(msg_id)) {
      --m->running;
      crashed(*m, call, what, why);
    }
  }
  schedule();
}

void Dispatcher::crashed(Message& m, const std::string& call_json, const std::string& what, const std::string& why) {
  if (m.orphan || !m_connected || m.no_ack) {
    // The broker redelivers the whole message anyway; a ping through the
    // rank queue is simply not answered.
    maybe_complete(m);
    return;
  }
  int crashes = m.crashes + 1;
  // The original body when it is exactly this call; else a one-call message
  // (as delivered: worker_processes is set again for the next handler).
  std::string body =
      (m.kind == Kind::control || m.calls.size() == 1) ? m.d.body : encode_text(Action::send_task, call_json);
  if (crashes >= m_opts.max_crashes) {
    spdlog::error("{} (message {}) killed its handler {} times, last: {}: moving it to {}", what, m.mid, crashes, why,
                  dead_queue());
    dead_letter(m, body, "crashed the handler " + std::to_string(crashes) + " times; last: " + why, crashes);
  } else {
    spdlog::warn("handler died running {} (message {}): {}; requeued it", what, m.mid, why);
    auto props = republish_props(m);
    props.headers[k_hdr_crashes] = static_cast<std::int64_t>(crashes);
    auto seq = m_broker.publish(home_queue(m), body, props);
    m_pending[seq] = {m.id, Purpose::crash_requeue};
    ++m.confirms;
    ++m_counters.tasks_requeued;
  }
  maybe_complete(m);
}

void Dispatcher::dead_letter(Message& m, const std::string& body, const std::string& reason, int crashes) {
  amqp::Properties p = m.d.props;
  p.delivery_mode = 2;
  p.expiration.clear();
#if LHPC_TEST_HOOKS
  p.headers.erase(k_hdr_sent_ns);
#endif
  p.headers[k_hdr_reason] = reason;
  p.headers[k_hdr_rank] = static_cast<std::int64_t>(m_opts.rank);
  p.headers[k_hdr_host] = m_opts.node;
  p.headers[k_hdr_message_id] = m.mid;
  p.headers[k_hdr_redelivered] = m.d.redelivered;
  p.headers[k_hdr_exchange] = m.d.exchange;
  p.headers[k_hdr_routing_key] = m.d.routing_key;
  p.headers[k_hdr_crashes] = static_cast<std::int64_t>(crashes);
  p.headers[k_hdr_time] = static_cast<std::int64_t>(std::time(nullptr));
  auto seq = m_broker.publish(dead_queue(), body, p);
  m_pending[seq] = {m.id, Purpose::dead_letter};
  ++m.confirms;
  ++m_counters.dead_lettered;
}

void Dispatcher::release_slots(std::uint64_t msg) {
  for (int i = 0; i < m_opts.slots; ++i) {
    if (m_slots[i].reserved_for == msg && m_slots[i].request == 0) {
      m_slots[i].reserved_for = 0;
    }
  }
}

void Dispatcher::maybe_complete(Message& m) {
  if (m.phase != Phase::running || m.running > 0 || m.confirms > 0 || m.next < m.end) {
    return;
  }
  auto id = m.id;
  if (!m.orphan && m_connected && !m_aborted && !m.no_ack) {
    if (m.give_back) {
      m_broker.reject(m.d.tag, true);
      ++m_counters.tasks_requeued;
    } else {
#if LHPC_TEST_HOOKS
      if (m_on_ack && m.kind != Kind::moved) {  // a moved message is acked again where it runs
        m_on_ack(m.d);
      }
#endif
      m_broker.ack(m.d.tag);
    }
  }
  release_slots(id);
  m_msgs.erase(id);
  update_prefetch();
}

// --- the reserve's patience ---------------------------------------------------

std::optional<Dispatcher::Clock::time_point> Dispatcher::next_deadline() const {
  std::optional<Clock::time_point> due;
  if (!m_connected || m_draining) {
    return due;
  }
  for (auto id : m_waiting) {
    auto it = m_msgs.find(id);
    if (it == m_msgs.end() || !may_give_back(it->second)) {
      continue;
    }
    auto t = it->second.arrived + m_opts.reserve_patience;
    due = due ? std::min(*due, t) : t;
  }
  return due;
}

void Dispatcher::on_tick(Clock::time_point now) {
  if (!m_connected || m_draining) {
    return;
  }
  for (auto it = m_waiting.begin(); it != m_waiting.end();) {
    Message* m = find(*it);
    if (!m || !may_give_back(*m) || now - m->arrived < m_opts.reserve_patience) {
      ++it;
      continue;
    }
    // Requeued to its place at the head of the queue: an idle rank's slot
    // consumer takes it first; if it comes back here, it stays (patient).
    if (m_returned.size() > 4096) {
      m_returned.clear();  // bounded: a long-lived worker forgets old ones
    }
    m_returned.insert(std::hash<std::string>{}(m->d.body));
    spdlog::debug("{} ({}): waited {} ms in the reserve, given back for a free slot elsewhere", m->mid,
                  m->calls.describe(0, m->calls.size()), m_opts.reserve_patience.count());
    m_broker.reject(m->d.tag, true);
    ++m_counters.returned;
    m_msgs.erase(*it);
    it = m_waiting.erase(it);
  }
  update_prefetch();
}

// --- drain -----------------------------------------------------------------

void Dispatcher::drain() {
  if (m_draining) {
    return;
  }
  m_draining = true;
  if (m_connected) {
    m_broker.stop_consuming();
  }
  // Messages that have not started go back to the queue now, for others.
  auto give_back = [&](std::deque<std::uint64_t>& q) {
    for (auto id : q) {
      if (Message* m = find(id)) {
        if (m_connected && !m->orphan && !m->no_ack) {
          m_broker.reject(m->d.tag, true);
          ++m_counters.tasks_requeued;
        }
        release_slots(id);
        m_msgs.erase(id);
      }
    }
    q.clear();
  };
  give_back(m_waiting);
  give_back(m_control_todo);
}

void Dispatcher::abort() {
  m_draining = true;
  for (auto& [id, m] : m_msgs) {
    if (m_connected && !m.orphan && !m.no_ack) {
      m_broker.reject(m.d.tag, true);
      ++m_counters.tasks_requeued;
    }
  }
  m_aborted = true;
  m_msgs.clear();
  m_waiting.clear();
  m_control_todo.clear();
  m_control_out.clear();
  m_pending.clear();
  for (auto& s : m_slots) {
    s.reserved_for = 0;
    s.request = 0;
    s.call.clear();
    s.what.clear();
  }
}

}  // namespace lhpc::dispatch
