%%% Drives messenger.erl (the seed) for benchmarks/erlang_ref.py: the same scenarios as the Python
%%% messenger's benchmarks, measured on the seed's own server and clients.
%%%
%%% The driver runs on the server's node (so that it can trace the server, see crash_wait) and
%%% spawns the users' processes on two client nodes. It reads one command a line on stdin and
%%% answers each with one JSON object a line on stdout:
%%%
%%%   throughput Window Pairs Total -> {"msgs":..,"seconds":..,"msgs_per_s":..}
%%%   rtt Samples                   -> {"samples":..,"p50_us":..,"p99_us":..,"p999_us":..}
%%%   logon Count                   -> {"logons":..,"seconds":..,"logons_per_s":..}
%%%   crash_prep VictimNode         -> {"ready":true,"os_pid":".."} (a user is logged on there)
%%%   crash_wait                    -> {"removed_ns":..} (os:system_time when the server removed it)
%%%   quit
%%%
%%% Any failure answers {"error":".."}. Every node halts when its stdin closes, so none outlives
%%% the harness that started it, whatever happens to the harness.
%%%
%%% The seed allows one user per node (the registered mess_client); here a node runs many users,
%%% one per client process (messenger:client/3), as the Python benchmarks run many clients per
%%% host. What the seed prints goes to an output fun instead: a user's "printing callback" counts
%%% or forwards, and the server's "list is now" (a debugging print, O(users) per message) is
%%% dropped, as the Python coordinator logs nothing per message.

-module(bench).
-export([driver/1, node_main/0,
         sender/6, receiver/4, pinger/5, echoer/3, logon_burst/4, victim/3]).

-define(DEADLINE, 10000).        % ms: any step that should be quick (a node up, a logon)
-define(RUN_DEADLINE, 120000).   % ms: a whole measured run
-define(TEXT, <<"hello">>).
-define(WARMUP, 100).            % round trips not counted

%%% --- entry points --------------------------------------------------------------------------

%% erl -run bench node_main: a client node, which does nothing by itself.
node_main() ->
    spawn(fun stdin_watch/0),
    ok.

%% erl -run bench driver C1 C2: the server's node. -run's function must return (init waits).
driver(ClientNodes) ->
    spawn(fun() -> drive([list_to_atom(N) || N <- ClientNodes]) end),
    ok.

stdin_watch() ->
    case io:get_line("") of
        eof -> halt(0);
        {error, _} -> halt(0);
        _ -> stdin_watch()
    end.

drive([C1, C2]) ->
    try
        Deadline = deadline(?DEADLINE),
        [wait_node(N, Deadline) || N <- [C1, C2]],
        messenger:start_server(fun(_) -> ok end),
        reply(#{ready => true, otp => list_to_binary(erlang:system_info(otp_release))})
    catch
        Class:Error -> reply(#{error => format({Class, Error})}), halt(1)
    end,
    loop(#{c1 => C1, c2 => C2, run => 0}).

loop(State = #{run := Run}) ->
    case io:get_line("") of
        eof -> halt(0);
        {error, _} -> halt(0);
        Line ->
            Words = string:lexemes(string:trim(Line), " "),
            {Reply, Next} =
                try command(Words, State)
                catch
                    Class:Error:Stack ->
                        {#{error => format({Class, Error, hd(Stack ++ [none])})}, State}
                end,
            reply(Reply),
            loop(Next#{run := Run + 1})
    end.

command(["throughput", Window, Pairs, Total], S = #{c1 := C1, c2 := C2, run := Run}) ->
    {throughput(C1, C2, int(Window), int(Pairs), int(Total), Run), S};
command(["rtt", Samples], S = #{c1 := C1, c2 := C2, run := Run}) ->
    {rtt(C1, C2, int(Samples), Run), S};
command(["logon", Count], S = #{c1 := C1, c2 := C2, run := Run}) ->
    {logon(C1, C2, int(Count), Run), S};
command(["crash_prep", Victim], S = #{run := Run}) ->
    {Reply, Tracer} = crash_prep(list_to_atom(Victim), Run),
    {Reply, S#{tracer => Tracer}};
command(["crash_wait"], S = #{tracer := Tracer}) ->
    {crash_wait(Tracer), maps:remove(tracer, S)};
command(["quit"], _) ->
    halt(0);
command(Words, _) ->
    error({bad_command, Words}).

%%% --- one-way throughput --------------------------------------------------------------------

%% Pairs senders on C1, each to its own receiver on C2, Total messages in all. A sender keeps
%% Window messages handed to its client (1: each send awaited, as the seed's message does: the
%% client forwards it and waits for sent). The seed's client has one request at the server at a
%% time (await_result), so a window > 1 queues at the client rather than at the server.
throughput(C1, C2, Window, Pairs, Total, Run) ->
    Per = max(1, Total div Pairs),
    Names = [{name(Run, s, I), name(Run, r, I)} || I <- lists:seq(1, Pairs)],
    Receivers = [spawn_monitor(C2, ?MODULE, receiver, [self(), node(), R, Per])
                 || {_, R} <- Names],
    await_all(ready, Receivers, deadline(?DEADLINE)),
    Senders = [spawn_monitor(C1, ?MODULE, sender, [self(), node(), S, R, Per, Window])
               || {S, R} <- Names],
    await_all(ready, Senders, deadline(?DEADLINE)),
    T0 = erlang:monotonic_time(microsecond),
    [Pid ! go || {Pid, _} <- Senders],
    await_all(received_all, Receivers, deadline(?RUN_DEADLINE)),
    T1 = erlang:monotonic_time(microsecond),
    await_all(sent_all, Senders, deadline(?DEADLINE)),
    stop_all(Senders ++ Receivers),
    Msgs = Per * Pairs,
    #{msgs => Msgs, seconds => (T1 - T0) / 1.0e6, msgs_per_s => Msgs * 1.0e6 / max(1, T1 - T0)}.

sender(Driver, ServerNode, Name, To, Count, Window) ->
    Client = logged_on_client(ServerNode, Name, forward(self())),
    Driver ! {ready, self()},
    receive go -> ok end,
    First = min(Window, Count),
    [messenger:message(Client, To, ?TEXT) || _ <- lists:seq(1, First)],
    send_loop(Client, To, Count - First, Count),
    Driver ! {sent_all, self()},
    finish(Driver, Client).

send_loop(_, _, _, 0) ->
    ok;
send_loop(Client, To, Unsent, Unanswered) ->
    receive
        {out, Client, {result, sent}} when Unsent > 0 ->
            messenger:message(Client, To, ?TEXT),
            send_loop(Client, To, Unsent - 1, Unanswered - 1);
        {out, Client, {result, sent}} ->
            send_loop(Client, To, 0, Unanswered - 1);
        {out, Client, Other} ->
            exit({unexpected, Other})
    after ?DEADLINE ->
            exit(no_reply)
    end.

%% The printing callback's stand-in counts in the client's own process (where the seed prints)
%% and tells the driver directly once all have come, so the end of a run costs one hop.
receiver(Driver, ServerNode, Name, Count) ->
    Self = self(),
    Out = fun({message_from, _, _}) ->
                  N = case get(received) of undefined -> 1; M -> M + 1 end,
                  put(received, N),
                  case N of
                      Count -> Driver ! {received_all, Self};
                      _ -> ok
                  end;
             (Event) ->
                  Self ! {out, self(), Event}
          end,
    Client = logged_on_client(ServerNode, Name, Out),
    Driver ! {ready, Self},
    finish(Driver, Client).

%%% --- round trip ----------------------------------------------------------------------------

%% A (on C1) sends to B (on C2), whose callback answers with message(A, Text) at once; the time
%% is from A's message to A's callback seeing B's answer.
rtt(C1, C2, Samples, Run) ->
    A = name(Run, a, 1),
    B = name(Run, b, 1),
    Echo = spawn_monitor(C2, ?MODULE, echoer, [self(), node(), B]),
    await_all(ready, [Echo], deadline(?DEADLINE)),
    Ping = spawn_monitor(C1, ?MODULE, pinger, [self(), node(), A, B, Samples]),
    await_all(ready, [Ping], deadline(?DEADLINE)),
    {PingPid, _} = Ping,
    PingPid ! go,
    Micros = receive {rtt, PingPid, Us} -> lists:sort(Us) after ?RUN_DEADLINE -> error(rtt) end,
    stop_all([Ping, Echo]),
    #{samples => length(Micros),
      p50_us => percentile(0.5, Micros),
      p99_us => percentile(0.99, Micros),
      p999_us => percentile(0.999, Micros)}.

pinger(Driver, ServerNode, Name, To, Samples) ->
    Client = logged_on_client(ServerNode, Name, forward(self())),
    Driver ! {ready, self()},
    receive go -> ok end,
    _ = [round_trip(Client, To) || _ <- lists:seq(1, ?WARMUP)],
    Us = [round_trip(Client, To) || _ <- lists:seq(1, Samples)],
    Driver ! {rtt, self(), Us},
    finish(Driver, Client).

round_trip(Client, To) ->
    T0 = erlang:monotonic_time(),
    messenger:message(Client, To, ?TEXT),
    receive {out, Client, {result, sent}} -> ok after ?DEADLINE -> exit(no_sent) end,
    receive
        {out, Client, {message_from, To, _}} ->
            erlang:convert_time_unit(erlang:monotonic_time() - T0, native, nanosecond) / 1000
    after ?DEADLINE -> exit(no_echo)
    end.

echoer(Driver, ServerNode, Name) ->
    Self = self(),
    Out = fun({message_from, From, Text}) -> messenger:message(self(), From, Text);
             ({result, sent}) -> ok;
             (Event) -> Self ! {out, self(), Event}
          end,
    Client = logged_on_client(ServerNode, Name, Out),
    Driver ! {ready, Self},
    finish(Driver, Client).

%% Nearest rank: the smallest sample with at least Q of all at or below it.
percentile(Q, Sorted) ->
    lists:nth(max(1, ceil(Q * length(Sorted))), Sorted).

%%% --- logon rate ----------------------------------------------------------------------------

%% Count users log on at once, half from each client node; the time is until every one has its
%% logged_on. The seed's user list is a list, so each logon costs O(users logged on).
logon(C1, C2, Count, Run) ->
    Half = Count div 2,
    Bursts = [spawn_monitor(C1, ?MODULE, logon_burst, [self(), node(), name(Run, l1, 0), Half]),
              spawn_monitor(C2, ?MODULE, logon_burst,
                            [self(), node(), name(Run, l2, 0), Count - Half])],
    await_all(ready, Bursts, deadline(?DEADLINE)),
    T0 = erlang:monotonic_time(microsecond),
    [Pid ! go || {Pid, _} <- Bursts],
    await_all(logged_on_all, Bursts, deadline(?RUN_DEADLINE)),
    T1 = erlang:monotonic_time(microsecond),
    stop_all(Bursts),
    #{logons => Count, seconds => (T1 - T0) / 1.0e6,
      logons_per_s => Count * 1.0e6 / max(1, T1 - T0)}.

logon_burst(Driver, ServerNode, Prefix, Count) ->
    Driver ! {ready, self()},
    receive go -> ok end,
    Out = forward(self()),
    Clients = [spawn(messenger, client,
                     [ServerNode, list_to_atom(atom_to_list(Prefix) ++ integer_to_list(I)), Out])
               || I <- lists:seq(1, Count)],
    [receive {out, C, {result, logged_on}} -> ok after ?DEADLINE -> exit(no_logon) end
     || C <- Clients],
    Driver ! {logged_on_all, self()},
    receive stop -> ok end,
    logoff_all(Clients),
    Driver ! {stopped, self()}.

%%% --- kill -9 of a client node --------------------------------------------------------------

%% A user logs on from Victim; the server's removal of it (server_logoff, the seed's handling of
%% its EXIT) is traced, so the time is taken when the server does it, not when someone asks.
%% The harness then kill -9s Victim's OS process and asks crash_wait when that happened.
crash_prep(Victim, Run) ->
    wait_node(Victim, deadline(?DEADLINE)),
    OsPid = rpc:call(Victim, os, getpid, [], ?DEADLINE),
    User = spawn_monitor(Victim, ?MODULE, victim, [self(), node(), name(Run, v, 1)]),
    {UserPid, Ref} = User,
    Client = receive
                 {ready, UserPid, C} -> C;
                 {'DOWN', Ref, process, UserPid, Why} -> error({victim, Why})
             after ?DEADLINE -> error(victim_timeout)
             end,
    demonitor(Ref, [flush]),   % it dies with its node: that is the point
    Tracer = spawn(fun() -> removal_tracer(Client) end),
    erlang:trace_pattern({messenger, server_logoff, 2}, true, [local]),
    erlang:trace(whereis(messenger), true, [call, {tracer, Tracer}]),
    {#{ready => true, os_pid => list_to_binary(OsPid)}, Tracer}.

removal_tracer(Client) ->
    receive
        {trace, _, call, {messenger, server_logoff, [Client, _]}} ->
            Removed = os:system_time(nanosecond),
            receive {removed, From} -> From ! {removed, self(), Removed} end;
        {trace, _, call, _} ->
            removal_tracer(Client)
    end.

crash_wait(Tracer) ->
    Tracer ! {removed, self()},
    Reply = receive
                {removed, Tracer, Removed} -> #{removed_ns => Removed}
            after ?DEADLINE -> #{error => <<"the server did not remove the killed node's user">>}
            end,
    exit(Tracer, kill),
    erlang:trace(whereis(messenger), false, [call]),
    erlang:trace_pattern({messenger, server_logoff, 2}, false, [local]),
    Reply.

victim(Driver, ServerNode, Name) ->
    Client = logged_on_client(ServerNode, Name, forward(self())),
    Driver ! {ready, self(), Client},
    receive stop -> ok end.

%%% --- helpers -------------------------------------------------------------------------------

%% A client (the seed's, linked: if it stops, so does its user) once the server said logged_on.
logged_on_client(ServerNode, Name, Out) ->
    Client = spawn_link(messenger, client, [ServerNode, Name, Out]),
    receive
        {out, Client, {result, logged_on}} -> Client;
        {out, Client, Other} -> exit({logon, Other})
    after ?DEADLINE -> exit(logon_timeout)
    end.

%% The callback of a user whose owner process handles every event itself.
forward(Owner) ->
    fun(Event) -> Owner ! {out, self(), Event} end.

%% Log the user off when the driver says so; stopped once the client is gone (see server_idle).
finish(Driver, Client) ->
    receive stop -> ok end,
    logoff_all([Client]),
    Driver ! {stopped, self()}.

logoff_all(Clients) ->
    Refs = [{monitor(process, C), C} || C <- Clients],
    [C ! logoff || C <- Clients],
    [receive {'DOWN', Ref, process, _, _} -> ok after ?DEADLINE -> exit(logoff_timeout) end
     || {Ref, _} <- Refs],
    ok.

%% The users log off; back once the server has removed them all, so that the next run does not
%% share the server with this one's removals (each is O(users): lists:keydelete).
stop_all(Procs) ->
    [Pid ! stop || {Pid, _} <- Procs],
    await_all(stopped, Procs, deadline(?DEADLINE)),
    [demonitor(Ref, [flush]) || {_, Ref} <- Procs],
    server_idle(whereis(messenger), deadline(?RUN_DEADLINE)).

%% Every EXIT is in the server's queue by now (a client's EXIT left on the same connection before
%% its user's stopped), so an empty queue and a server waiting in receive mean all are done.
server_idle(Server, Deadline) ->
    case process_info(Server, [message_queue_len, status]) of
        [{message_queue_len, 0}, {status, waiting}] -> ok;
        _ ->
            case left(Deadline) of
                0 -> error(server_busy);
                _ -> receive after 1 -> server_idle(Server, Deadline) end
            end
    end.

%% {Tag, Pid} from every one of Procs (spawn_monitor results), failing if one dies first.
await_all(Tag, Procs, Deadline) ->
    [receive
         {Tag, Pid} -> ok;
         {'DOWN', Ref, process, Pid, Why} -> error({Tag, Pid, Why})
     after left(Deadline) -> error({timeout, Tag})
     end || {Pid, Ref} <- Procs],
    ok.

wait_node(Node, Deadline) ->
    case net_adm:ping(Node) of
        pong -> ok;
        pang ->
            case left(Deadline) of
                0 -> error({node_down, Node});
                _ -> receive after 20 -> wait_node(Node, Deadline) end
            end
    end.

deadline(Ms) -> erlang:monotonic_time(millisecond) + Ms.

left(Deadline) -> max(0, Deadline - erlang:monotonic_time(millisecond)).

name(Run, Role, I) ->
    list_to_atom(lists:flatten(io_lib:format("~s~B_~B", [Role, Run, I]))).

int(Word) -> list_to_integer(Word).

format(Term) -> iolist_to_binary(io_lib:format("~0p", [Term])).

%% One JSON object a line; values are numbers, booleans or binaries (escaped for \ and ").
reply(Map) ->
    Fields = [[$", atom_to_list(K), $", $:, json(V)] || {K, V} <- lists:sort(maps:to_list(Map))],
    io:put_chars([${, lists:join($,, Fields), $}, $\n]).

json(true) -> "true";
json(false) -> "false";
json(N) when is_integer(N) -> integer_to_list(N);
json(F) when is_float(F) -> float_to_list(F, [{decimals, 3}, compact]);
json(B) when is_binary(B) ->
    [$", [case C of $" -> "\\\""; $\\ -> "\\\\"; C when C < 32 -> " "; C -> C end
          || <<C>> <= B], $"].
